"""ModelParallelAlexNet: the two-tower network on Ray, driven from the caller's process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.engine.coordinator_actor import PROBE_SECONDS, Coordinator, TowerFailure, unanswered
from coordinator.engine.placement import Placement, ensure_ray, free_devices
from coordinator.engine.replicas import ReplicaGroup, in_groups
from coordinator.engine.tower_actor import TowerActor
from coordinator.engine.transport import EXCHANGE_TIMEOUT, ExchangeError, InferenceGraph, check_transport, make_transport
from towers import NetConfig, merge_state_dicts, split_state_dict
from towers.config import derive_seed


class ModelParallelAlexNet:
    """AlexNet with each tower in its own Ray actor and a coordinator actor for the exchanges.

    Keywords beyond the optimiser's are NetConfig fields (width, image_size, towers, init, layers).
    transport names how exchanged tensors travel: "object_store", "collective" (a torch.distributed
    group: NCCL between GPUs, Gloo otherwise) or "auto" (coordinator.engine.transport.make_transport);
    exchange_timeout is how long a tower waits for its peers in an exchange before the step fails
    (a TowerFailure then names the towers that died or stopped answering); restart_tower replaces one.
    cpus_per_tower sets each CPU tower's cores and threads; dtype is float32 or float64; tf32 lets
    CUDA towers use TensorFloat-32 (faster, no longer equal to the reference at 1e-5).
    start_timeout is how long to wait for the towers to be placed and started (an autoscaling
    cluster may be adding a node); past it a RuntimeError says what they need and what is free.
    keep_freed_memory has each tower's allocator keep what it frees for the next step (glibc;
    faster steps on CPU for a step's peak memory staying resident, see docs/performance.md);
    False returns it. nice lowers the towers' CPU priority by 0 to 19: a serving pair that shares
    CPUs with a training pair may yield to it.

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
        **config,
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.config = NetConfig(num_classes=num_classes, dropout=dropout, **config)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        check_transport(transport)
        if not (isinstance(replicas, int) and replicas >= 1):
            raise ValueError(f"replicas must be a whole number of at least 1, got {replicas!r}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be between 0 and 19, got {nice}")
        if not exchange_timeout > 0:
            raise ValueError(f"exchange_timeout must be positive, got {exchange_timeout}")
        self.lr, self.seed, self.steps, self.dtype = lr, seed, 0, dtype
        ensure_ray()
        self.replicas = replicas
        self.placement = Placement.plan(self.config.towers * replicas, cpus_per_tower)
        self.transport = make_transport(transport, self.placement.kind, exchange_timeout)
        self._groups = self.placement.reserve_groups(replicas, self.config.towers, start_timeout)
        self._tower_args = dict(
            seed=seed,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            threads=cpus_per_tower,
            dtype=dtype,
            tf32=tf32,
            keep_freed_memory=keep_freed_memory,
            nice=nice,  # CPU priority lowered by this much: a serving pair may yield to training
        )
        self._towers = [self._start_tower(i) for i in range(self.config.towers * replicas)]
        self._coordinator = None
        self.repaired: list[int] = []  # the towers the last repair() replaced
        self._graph: Optional[InferenceGraph] = None
        self._graph_lock = threading.Lock()
        self._teardown: Optional[threading.Thread] = None  # of the last graph, while it runs
        try:
            self.towers = ray.get([t.describe.remote() for t in self._towers], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"the {self.config.towers} towers did not start within {start_timeout:g} s: each needs "
                f"{self.placement.actor_options}, and the cluster has {free_devices()} free; "
                "shut down another model (engine.shutdown()) or add nodes"
            ) from None
        self._start_coordinator()

    def _start_coordinator(self) -> None:
        # The coordinator only routes and computes the loss: it needs no core of its own. It stays
        # beside the driver, so that losing a node of towers does not take it too. Not soft: Ray
        # 2.60 places a soft-pinned actor of no CPUs elsewhere, and the driver's node always fits it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._coordinator = ray.remote(Coordinator).options(num_cpus=0, scheduling_strategy=here).remote(
            self._towers, self.config, self.transport, self.replicas
        )
        ray.get(self._coordinator.take_stats.remote())  # surfaces a transport that could not link the towers

    def _start_tower(self, i: int):
        """Tower i: tower i % T of replica group i // T."""
        group, t = divmod(i, self.config.towers)
        backend = "nccl" if self.placement.kind == "gpu" else "gloo"  # NCCL takes one rank per GPU
        replicas = ReplicaGroup(backend, self.transport.timeout)
        options = {**self.placement.actor_options, **self.placement.in_group(self._groups, group)}
        return ray.remote(TowerActor).options(**options).remote(self.config, t, self.transport, **self._tower_args, replicas=replicas)

    def repair(self) -> list[str]:
        """Replace every actor of the model that is dead or hung: what was replaced, e.g. "tower 1
        (died; pid 123 on host)". Replaced towers start from their initial weights: load the
        model's state before going on. Empty when every actor answered."""
        replaced, self.repaired = [], []
        for t, why in self.lost_towers().items():
            old = self.towers[t]
            self.repaired.append(t)
            name = f"tower {t}" if self.replicas == 1 else "group {} tower {}".format(*divmod(t, self.config.towers))
            replaced.append(f"{name} ({why}; pid {old['pid']} on {old['host']})")
            self.restart_tower(t, relink=False)
        try:
            ray.get(self._coordinator.ping.remote(), timeout=PROBE_SECONDS)
            if replaced:
                ray.get(self._coordinator.connect.remote(self._towers))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
            replaced.append(f"the coordinator ({'died' if isinstance(error, ray.exceptions.RayActorError) else 'hung'})")
            ray.kill(self._coordinator)
            self._start_coordinator()
        return replaced

    def restart_tower(self, t: int, relink: bool = True) -> None:
        """Replace tower t with a new actor (the old one is killed if it still runs) and link it
        in: the transport forms its next generation. The new tower has its initial weights and
        no momentum; load the model's weights (load_state_dict) before training on."""
        if not 0 <= t < len(self._towers):
            raise ValueError(f"tower must be in [0, {len(self._towers)}), got {t}")
        with self._graph_lock:
            self._drop_graph(wait=PROBE_SECONDS)
        ray.kill(self._towers[t])
        self._towers[t] = self._start_tower(t)
        self.towers[t] = ray.get(self._towers[t].describe.remote())
        if relink:
            ray.get(self._coordinator.connect.remote(self._towers))

    def lost_towers(self) -> dict[int, str]:
        """The towers that are dead or do not answer within seconds, each with what happened to it
        ("died"; coordinator.engine.named makes a phrase of them)."""
        return unanswered([t.describe.remote() for t in self._towers])

    # --- input checks -------------------------------------------------------------------------
    def _check_images(self, images) -> torch.Tensor:
        images = torch.as_tensor(images, dtype=self.dtype)
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape [N, 3, {size}, {size}], got {list(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        # A sum is one fast pass and is NaN or infinite if any pixel is; only then check pixel by pixel.
        if not torch.isfinite(images.sum()) and not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        return images

    def _check_labels(self, labels, batch: int) -> np.ndarray:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.shape != (batch,):
            raise ValueError(f"labels must be {batch} integer class indices, got {labels.dtype} {list(labels.shape)}")
        if batch and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"labels must be in [0, {self.config.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        return labels.to(torch.long).numpy()

    # --- training -----------------------------------------------------------------------------
    def _batch(self, images, labels, dropout_seed: Optional[int]) -> tuple:
        """Checked and uploaded inputs of the next step; dropout masks default to a seed per step."""
        images = self._check_images(images)
        labels = self._check_labels(labels, images.shape[0])
        if dropout_seed is None:
            dropout_seed = derive_seed(self.seed, "step", self.steps)
        if len(images) % self.replicas:
            raise ValueError(f"a batch of {len(images)} images does not split evenly among {self.replicas} replica "
                             f"groups: use a batch size that is a multiple of {self.replicas}")  # fmt: skip
        shards = [self.transport.put_images(shard) for shard in images.chunk(self.replicas)]
        return shards, list(np.split(labels, self.replicas)), dropout_seed

    def forward_backward(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """Loss of one batch, leaving its gradients in the towers (see gradients(), apply_update())."""
        return result(self._coordinator.forward_backward.remote(*self._batch(images, labels, dropout_seed)))

    def apply_update(self) -> None:
        result(self._coordinator.apply_update.remote(self.lr))
        self.steps += 1

    def zero_grad(self) -> None:
        """Drop gradients accumulated by forward_backward without applying them."""
        self._gather("abandon_step")

    def train_step(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """One SGD step on a batch; returns its loss (before the update)."""
        return result(self.submit_step(images, labels, dropout_seed))

    def submit_step(self, images, labels, dropout_seed: Optional[int] = None, with_stats: bool = False):
        """Start one SGD step and return at once: an ObjectRef to its loss (and its timings, with_stats).

        Steps run in the order submitted. Submitting the next batch before the current step ends
        keeps the towers busy while this process prepares and uploads images.
        """
        images, labels, dropout_seed = self._batch(images, labels, dropout_seed)
        self.steps += 1
        return self._coordinator.train_step.remote(images, labels, self.lr, dropout_seed, with_stats)

    def predict(self, images) -> torch.Tensor:
        """Logits in eval mode (no dropout), through the transport's inference graph (made on first use)."""
        images = self._check_images(images)
        with self._graph_lock:
            if self._graph is None:
                self._await_teardown()
                self._graph = self.transport.compile_inference(self._group(0), len(self.config.segments))
            try:
                return self._graph.run(images)
            except Exception:
                self._drop_graph()  # a failed run can leave the graph unusable: rebuild it next time
                raise

    def _drop_graph(self, wait: float = 0.0) -> None:
        # Ray's teardown waits for every tower to leave the graph, which a hung one never does: it
        # runs aside, so that the caller can go on to replace that tower (which ends the wait).
        # Before killing towers, wait for it a while: healthy ones leave at once, and a tower killed
        # inside the teardown makes Ray log an error with a traceback.
        if self._graph is not None:
            graph, self._graph = self._graph, None
            self._teardown = threading.Thread(target=graph.close, name="inference-graph-teardown", daemon=True)
            self._teardown.start()
            self._teardown.join(wait)

    def _await_teardown(self) -> None:
        """A new graph over the towers waits until the last one has let go of them."""
        if self._teardown is not None:
            self._teardown.join(self.transport.timeout)
            if self._teardown.is_alive():
                raise ExchangeError(f"the last inference graph still holds the towers after {self.transport.timeout:g} s: "
                                    "a tower is hung; replace it (repair)")  # fmt: skip
            self._teardown = None

    def take_stats(self) -> dict:
        """Per-tower compute and exchange timings and bytes since the last call, and the coordinator's time."""
        return ray.get(self._coordinator.take_stats.remote())

    # --- weights ------------------------------------------------------------------------------
    # Weights travel as numpy arrays, which Ray's object store holds without pickling.
    def gradients(self) -> OrderedDict:
        """The gradients that forward_backward left, of the whole batch: the mean of the groups'."""
        groups = [merge_state_dicts([_tensors(g) for g in group], self.config) for group in self._by_group(self._gather("gradients"))]
        return OrderedDict((name, sum(g[name] for g in groups) / self.replicas) for name in groups[0])

    def state_dict(self, group: int = 0) -> OrderedDict:
        """The weights, as one network's (a group's: every group holds the same)."""
        return merge_state_dicts([_tensors(s) for s in self._gather("get_state", self._group(group))], self.config)

    def load_state_dict(self, state: dict) -> None:
        """Load canonical weights into every group. The optimiser's momentum starts again from zero:
        it belonged to other weights."""
        pieces = [{k: v.numpy() for k, v in p.items()} for p in split_state_dict(state, self.config)] * self.replicas
        ray.get([t.set_state.remote(p) for t, p in zip(self._towers, pieces)])

    def optimizer_state(self, group: int = 0) -> list:
        """Each tower's optimiser state (momentum buffers; a group's), for checkpoints."""
        return self._gather("get_optimizer_state", self._group(group))

    def intact_group(self) -> Optional[int]:
        """With replicas: a group none of whose towers the last repair() replaced, or None."""
        lost = {t // self.config.towers for t in self.repaired}
        return next((g for g in range(self.replicas) if g not in lost), None) if self.replicas > 1 else None

    def load_optimizer_state(self, states: list) -> None:
        """Each tower's optimiser state, as optimizer_state() gave it (after load_state_dict, which
        clears it), into every group."""
        ray.get([t.set_optimizer_state.remote(s) for t, s in zip(self._towers, list(states) * self.replicas)])

    def replica_checksums(self) -> list[list[str]]:
        """Each group's towers' digests of weights and momentum: the groups agree while the lists do."""
        return self._by_group(self._gather("checksum"))

    def _group(self, g: int) -> list:
        return self._by_group(self._towers)[g]

    def _by_group(self, per_tower: list) -> list[list]:
        return in_groups(per_tower, self.config.towers)

    def _gather(self, method: str, towers: Optional[list] = None) -> list:
        return ray.get([getattr(t, method).remote() for t in (self._towers if towers is None else towers)])

    def shutdown(self) -> None:
        self._drop_graph(wait=PROBE_SECONDS)
        for actor in [self._coordinator, *self._towers]:
            if actor is not None:
                ray.kill(actor)
        self._towers = []
        self.placement.release_groups(self._groups)
        self._groups = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def result(ref):
    """ray.get of a step, with a TowerFailure raised as itself: one readable line, not inside
    Ray's wrapper with the coordinator's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, TowerFailure):
            raise error.cause from None
        raise


def _tensors(arrays: dict) -> dict:
    """Arrays from the object store (read-only shared memory) as tensors of their own."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
