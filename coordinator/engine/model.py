"""ModelParallelAlexNet: the two-tower network on Ray, driven from the caller's process."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.engine.batches import check_images, check_labels, put_batch
from coordinator.engine.calls import Pending, TowerCalls, agreed_loss, result
from coordinator.engine.coordinator_actor import Coordinator, in_groups
from coordinator.engine.links import EXCHANGE_TIMEOUT, backend_for, check_transport
from coordinator.engine.placement import Placement, ensure_ray, free_devices
from coordinator.engine.tower_actor import TowerActor
from towers import NetConfig, merge_state_dicts, split_state_dict
from towers.config import derive_seed
from towers.inputs import Crops
from towers.layers import frozen_layers
from towers.precision import check_precision, require_bf16


class ModelParallelAlexNet:
    """AlexNet with each tower in its own Ray actor and a coordinator actor that supervises them.

    Keywords beyond the optimiser's are NetConfig fields (width, image_size, towers, init, layers).
    Each step is one call to each tower, whose exchanges are collectives inside it, over a group
    of the towers; transport picks what carries them: "auto" (NCCL where each tower has a GPU of
    its own, else shared memory between towers on one host and Gloo between hosts), "gloo" or
    "nccl" (links.backend_for). exchange_timeout is how long
    a tower waits for its peers in an exchange before the step fails (a TowerFailure then names the
    towers that died or stopped answering); restart_tower replaces one, and after a failure the
    failure policy (coordinator.engine.failures) finds the lost actors and replaces them.
    tower_actors holds the towers' actor handles, tower_info what each said of itself (pid, host,
    node, device, ...), both group-major; coordinator is the coordinator actor's handle.
    cpus_per_tower sets each CPU tower's cores and threads; dtype is float32 or float64; tf32 lets
    CUDA towers use TensorFloat-32 (faster, no longer equal to the reference at 1e-5); precision
    "bfloat16" computes the layers in bf16 over float32 weights where the towers' devices have bf16
    arithmetic, and is refused where they do not (towers.precision).
    start_timeout is how long to wait for the towers to be placed and started (an autoscaling
    cluster may be adding a node); past it a RuntimeError says what they need and what is free.
    keep_freed_memory has each tower's allocator keep what it frees for the next step (glibc;
    faster steps on CPU for a step's peak memory staying resident: docs/performance.md, "Training step");
    False returns it. nice lowers the towers' CPU priority by 0 to 19: a serving pair that shares
    CPUs with a training pair may yield to it. freeze names layers whose weights no step changes
    (fine-tuning: "conv1-conv5", "fc6,fc7"; towers.layers.frozen_layers).

    replicas > 1 trains R data-parallel groups of the towers: each step's batch is split into R
    equal shards, one per group, and each tower's gradients are averaged with the same tower of
    the other groups (an all-reduce, coordinator.engine.replicas) before the update, which is the
    single-process step on the whole batch. Each group's towers are placed on one node (a bundle
    of one placement group), the groups spread over nodes where there are several. Weights and
    momentum are group 0's (state_dict); replica_checksums() shows that the groups agree.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        seed: int = 0,
        *,
        transport: str = "auto",
        exchange_timeout: float = EXCHANGE_TIMEOUT,
        cpus_per_tower: int = 1,
        dtype: torch.dtype = torch.float32,
        tf32: bool = False,
        start_timeout: float = 600.0,
        keep_freed_memory: bool = True,
        nice: int = 0,
        replicas: int = 1,
        precision: str = "float32",
        freeze: str = "",
        **config,
    ):
        _check_arguments(lr, momentum, weight_decay, dtype, precision, transport, replicas, nice, exchange_timeout)
        self.config = NetConfig(num_classes=num_classes, dropout=dropout, **config)
        self.lr, self.seed, self.steps, self.dtype, self.precision = lr, seed, 0, dtype, precision
        self.frozen = frozen_layers(freeze, self.config.layers)  # their weights stay as loaded
        ensure_ray()
        self.replicas = replicas
        self.placement = Placement.plan(self.config.towers * replicas, cpus_per_tower)
        self.backend = backend_for(transport, self.placement.kind)  # the pairs' exchanges and the replicas' all-reduce
        self.exchange_timeout = exchange_timeout
        self._groups = self.placement.reserve_groups(replicas, self.config.towers, start_timeout)
        self.tower_args = dict(
            seed=seed,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            threads=cpus_per_tower,
            dtype=dtype,
            tf32=tf32,
            keep_freed_memory=keep_freed_memory,
            nice=nice,  # CPU priority lowered by this much: a serving pair may yield to training
            backend=self.backend[0],
            timeout=exchange_timeout,
            precision=precision,
            frozen=self.frozen,
        )
        self.tower_actors = [self._start_tower(i) for i in range(self.config.towers * replicas)]
        self.coordinator = self._start_coordinator()  # its process starts while the towers' do
        self.calls = TowerCalls(lambda: self.tower_actors, lambda: self.coordinator, self.link)
        self.tower_info = self._described_towers(start_timeout)
        try:
            self.link()
        except BaseException:
            self.shutdown()  # towers that cannot be linked are no engine: their actors go
            raise

    def _described_towers(self, start_timeout: float) -> list[dict]:
        """Each tower's description once all have started (the engine is shut down if they do not,
        or lack the bf16 arithmetic asked for)."""
        try:
            described = ray.get([t.describe.remote() for t in self.tower_actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"the {self.config.towers} towers did not start within {start_timeout:g} s: each needs "
                f"{self.placement.actor_options}, and the cluster has {free_devices()} free; "
                "shut down another model (engine.shutdown()) or add nodes"
            ) from None
        if self.precision == "bfloat16" and (without := [t for t in described if not t["bf16"]]):
            self.shutdown()
            require_bf16(without[0]["device"] if without[0]["device"] == "cpu" else "cuda")  # raises, saying what to do
        return described

    def _start_coordinator(self):
        """A coordinator actor, which links no tower until link() asks it to."""
        # The coordinator carries no tensor and computes nothing: it needs no core of its own. It stays
        # beside the driver, so that losing a node of towers does not take it too. Not soft: Ray
        # 2.60 places a soft-pinned actor of no CPUs elsewhere, and the driver's node always fits it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return (
            ray.remote(Coordinator)
            .options(num_cpus=0, scheduling_strategy=here)
            .remote(self.config, self.backend, self.exchange_timeout, self.replicas)
        )

    def link(self) -> None:
        """Have the coordinator link the towers again, as the groups' next generation."""
        self.calls.relink = True  # until they are: a link that fails is tried again
        ray.get(self.coordinator.connect.remote(self.tower_actors))
        self.transport = result(self.coordinator.describe.remote())  # surfaces towers that could not be linked
        self.calls.relink = False

    def _start_tower(self, i: int):
        """Tower i: tower i % T of replica group i // T."""
        group, t = divmod(i, self.config.towers)
        options = {**self.placement.actor_options, **self.placement.in_group(self._groups, group)}
        return ray.remote(TowerActor).options(**options).remote(self.config, t, **self.tower_args)

    def rebuild(self, config: NetConfig, seed: Optional[int] = None, freeze: Optional[str] = None) -> None:
        """Compute another network (other classes, width or variant) with the same actors: each tower
        builds its layers afresh, as a new engine of `config`, `seed` and `freeze` would start them
        (None: this engine's), and the coordinator plans and links the exchanges for it. No process
        starts, where new actors take seconds. Load the new network's weights after (load_state_dict)."""
        if config.towers != self.config.towers:
            raise ValueError(
                f"a rebuilt engine keeps its {self.config.towers} towers, got a network of {config.towers}"
            )
        seed = self.seed if seed is None else seed
        frozen = frozen_layers(",".join(self.frozen) if freeze is None else freeze, config.layers)
        ray.get([t.rebuild.remote(config, seed, frozen) for t in self.tower_actors])
        ray.get(self.coordinator.rebuild.remote(config))
        self.config, self.seed, self.frozen, self.steps = config, seed, frozen, 0
        self.tower_args.update(seed=seed, frozen=frozen)  # what a tower that replaces a lost one starts from
        self.link()
        self.tower_info = ray.get([t.describe.remote() for t in self.tower_actors])

    def restart_tower(self, t: int, relink: bool = True) -> None:
        """Replace tower t with a new actor (the old one is killed if it still runs) and link it
        in: the transport forms its next generation. The new tower has its initial weights and
        no momentum; load the model's weights (load_state_dict) before training on. After a
        failure, the failure policy (failures.py) finds the lost towers and replaces them."""
        if not 0 <= t < len(self.tower_actors):
            raise ValueError(f"tower must be in [0, {len(self.tower_actors)}), got {t}")
        ray.kill(self.tower_actors[t])
        self.tower_actors[t] = self._start_tower(t)
        self.tower_info[t] = ray.get(self.tower_actors[t].describe.remote())
        if relink:
            self.link()

    def restart_coordinator(self) -> None:
        """Replace the coordinator with a new actor (the old one is killed if it still runs), which links the towers."""
        ray.kill(self.coordinator)
        self.coordinator = self._start_coordinator()
        self.link()

    # --- input checks -------------------------------------------------------------------------
    def _check_images(self, images) -> np.ndarray | Crops:
        return check_images(images, self.dtype, self.config.image_size)

    def _check_labels(self, labels, batch: int) -> np.ndarray:
        return check_labels(labels, batch, self.config.num_classes)

    def _put(self, images: np.ndarray | Crops) -> ray.ObjectRef:
        return put_batch(images)

    # --- training -----------------------------------------------------------------------------
    def _batch(self, images, labels, dropout_seed: Optional[int]) -> tuple:
        """Checked and uploaded inputs of the next step; dropout masks default to a seed per step."""
        images = self._check_images(images)
        labels = self._check_labels(labels, images.shape[0])
        if dropout_seed is None:
            dropout_seed = derive_seed(self.seed, "step", self.steps)
        if len(images) % self.replicas:
            raise ValueError(
                f"a batch of {len(images)} images does not split evenly among {self.replicas} replica "
                f"groups: use a batch size that is a multiple of {self.replicas}"
            )
        per = len(images) // self.replicas
        shards = [self._put(images[g * per : (g + 1) * per]) for g in range(self.replicas)]
        return shards, list(np.split(labels, self.replicas)), dropout_seed

    def forward_backward(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """Loss of one batch, leaving its gradients in the towers (see gradients(), apply_update())."""
        return self._step("forward_backward", images, labels, dropout_seed).result()

    def apply_update(self) -> None:
        self.calls.submit(
            [(t, (self.lr,)) for t in self.tower_actors], "apply_update", lambda results: None, stats=lambda r: r
        ).result()
        self.steps += 1

    def zero_grad(self) -> None:
        """Drop gradients accumulated by forward_backward without applying them."""
        self._gather("abandon_step")

    def train_step(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """One SGD step on a batch; returns its loss (before the update)."""
        return self.submit_step(images, labels, dropout_seed).result()

    def submit_step(self, images, labels, dropout_seed: Optional[int] = None, with_stats: bool = False) -> Pending:
        """Start one SGD step and return at once: a Pending, whose result() is the step's loss
        (and with_stats, the timings since the last take_stats).

        Steps run in the order submitted. Submitting the next batch before the current step ends
        keeps the towers busy while this process prepares and uploads images.
        """
        step = self._step("train_step", images, labels, dropout_seed, self.lr, with_stats=with_stats)
        self.steps += 1
        return step

    def _step(self, method: str, images, labels, dropout_seed, *extra, with_stats: bool = False) -> Pending:
        """One call per tower: each group's towers get its shard, and its first sample's place."""
        shards, labels, dropout_seed = self._batch(images, labels, dropout_seed)
        firsts = np.cumsum([0] + [len(shard) for shard in labels[:-1]])
        calls = [
            (tower, (shard, group_labels, dropout_seed, int(first), *extra))
            for group, shard, group_labels, first in zip(self._by_group(self.tower_actors), shards, labels, firsts)
            for tower in group
        ]

        def loss(results: list):
            value = agreed_loss([loss for loss, _ in results], self.config.towers)
            return (value, self.take_stats()) if with_stats else value

        return self.calls.submit(calls, method, loss, before_update=method != "train_step")

    def predict(self, images) -> torch.Tensor:
        """Logits in eval mode (no dropout): one call to each tower of group 0."""
        ref = self._put(self._check_images(images))
        logits = self.calls.submit(
            [(t, (ref,)) for t in self._group(0)], "infer", lambda results: results[0][0]
        ).result()
        return torch.from_numpy(np.array(logits))

    def solo_step_seconds(self, images, labels, steps: int = 5) -> list[list[float]]:
        """Each tower of group 0 alone, one after the other: the seconds of `steps` training steps
        of a copy of it at this batch's shapes, its exchanges replaced by local copies. Its compute
        with no wait on a peer (benchmarks/train_step.py sets the engine's step beside it)."""
        images = self._check_images(images)
        labels = self._check_labels(labels, len(images))
        ref = self._put(images)
        return [ray.get(t.solo_steps.remote(ref, labels, steps)) for t in self._group(0)]

    def take_stats(self) -> dict:
        """Per-tower compute and exchange timings and bytes since the last call, how many calls
        of the towers were made, and what carries the exchanges."""
        towers, calls = self.calls.take_stats()
        return {"towers": towers, "replicas": self.replicas, "tower_calls": calls, "transport": self.transport}

    # --- weights ------------------------------------------------------------------------------
    # Weights travel as numpy arrays, which Ray's object store holds without pickling.
    def gradients(self) -> OrderedDict:
        """The gradients that forward_backward left, of the whole batch: the mean of the groups'."""
        groups = [
            merge_state_dicts([_tensors(g) for g in group], self.config)
            for group in self._by_group(self._gather("gradients"))
        ]
        return OrderedDict((name, sum(g[name] for g in groups) / self.replicas) for name in groups[0])

    def state_dict(self, group: int = 0) -> OrderedDict:
        """The weights, as one network's (a group's: every group holds the same)."""
        return merge_state_dicts([_tensors(s) for s in self._gather("get_state", self._group(group))], self.config)

    def tower_weights(self, layer: str, group: int = 0) -> list[torch.Tensor]:
        """That layer's weight in each tower of a group, as the tower holds it (its rows of the layer)."""
        states = ray.get([t.get_state.remote(layer) for t in self._group(group)])
        return [_tensors(state)[f"{layer}.weight"] for state in states]

    def load_state_dict(self, state: dict) -> None:
        """Load canonical weights into every group. The optimiser's momentum starts again from zero:
        it belonged to other weights."""
        pieces = [{k: v.numpy() for k, v in p.items()} for p in split_state_dict(state, self.config)] * self.replicas
        ray.get([t.set_state.remote(p) for t, p in zip(self.tower_actors, pieces)])

    def optimizer_state(self, group: int = 0) -> list:
        """Each tower's optimiser state (momentum buffers; a group's), for checkpoints."""
        return self._gather("get_optimizer_state", self._group(group))

    def load_optimizer_state(self, states: list) -> None:
        """Each tower's optimiser state, as optimizer_state() gave it (after load_state_dict, which
        clears it), into every group."""
        ray.get([t.set_optimizer_state.remote(s) for t, s in zip(self.tower_actors, list(states) * self.replicas)])

    def replica_checksums(self) -> list[list[str]]:
        """Each group's towers' digests of weights and momentum: the groups agree while the lists do."""
        return self._by_group(self._gather("checksum"))

    def _group(self, g: int) -> list:
        return self._by_group(self.tower_actors)[g]

    def _by_group(self, per_tower: list) -> list[list]:
        return in_groups(per_tower, self.config.towers)

    def _gather(self, method: str, towers: Optional[list] = None) -> list:
        return ray.get([getattr(t, method).remote() for t in (self.tower_actors if towers is None else towers)])

    def shutdown(self) -> None:
        self.calls.close(wait=1.0)
        for actor in [self.coordinator, *self.tower_actors]:
            if actor is not None:
                ray.kill(actor)
        self.tower_actors = []
        self.placement.release_groups(self._groups)
        self._groups = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _check_arguments(
    lr, momentum, weight_decay, dtype, precision: str, transport: str, replicas, nice: int, exchange_timeout: float
) -> None:
    """Refuses, saying what to change, the constructor's arguments that no engine could run with."""
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if check_precision(precision) == "bfloat16" and dtype == torch.float64:
        raise ValueError(
            "precision bfloat16 computes in bf16 over float32 weights: it takes dtype float32, not float64"
        )
    check_transport(transport)
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ValueError(f"replicas must be a whole number of at least 1, got {replicas!r}")
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be between 0 and 19, got {nice}")
    if not exchange_timeout > 0:
        raise ValueError(f"exchange_timeout must be positive, got {exchange_timeout}")


def _tensors(arrays: dict) -> dict:
    """Arrays from the object store (read-only shared memory) as tensors of their own."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
