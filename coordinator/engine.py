"""ModelParallelAlexNet: the two-tower network on Ray, driven from the caller's process."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import torch

from coordinator.exchange import ObjectStoreExchange, compile_inference
from coordinator.step import Coordinator
from coordinator.worker import TowerWorker
from towers import NetConfig, merge_state_dicts, split_state_dict
from towers.config import derive_seed

logging.getLogger("ray.dag").setLevel(logging.WARNING)  # a line per graph built or torn down is noise


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join the Ray already initialised, or at `address` (else RAY_ADDRESS), or start a local one.

    A local Ray gets at least 6 logical CPUs whatever the machine has: a training pair and a
    serving pair of towers take one each, and data loading needs room beside them. The physical
    cores are shared; Ray's CPU count only decides what may be scheduled.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 6), include_dashboard=False)


def _free_devices() -> dict:
    return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}


# One GPU hosts this many models' towers when it is shared: the server's training and serving pairs.
MODELS_PER_SHARED_GPU = 2


@dataclass(frozen=True)
class Placement:
    """Where the towers go: one GPU each, a shared GPU, or CPU cores."""

    kind: str  # "gpu", "shared-gpu" or "cpu"
    actor_options: dict

    @staticmethod
    def plan(towers: int, cpus_per_tower: int = 1, resources: Optional[dict] = None) -> "Placement":
        """Placement for `towers` on a cluster with `resources` (default: the connected Ray cluster's)."""
        resources = ray.cluster_resources() if resources is None else resources
        gpus = int(resources.get("GPU", 0))
        if gpus >= towers:
            return Placement("gpu", {"num_gpus": 1, "num_cpus": 1})
        if gpus >= 1:
            share = 1.0 / (MODELS_PER_SHARED_GPU * towers)  # a quarter each for two towers
            return Placement("shared-gpu", {"num_gpus": share, "num_cpus": 1})
        cpus = resources.get("CPU", 0)
        if cpus < towers * cpus_per_tower:
            raise RuntimeError(
                f"the Ray cluster has {cpus:g} CPUs and no GPU, but {towers} towers need "
                f"{towers * cpus_per_tower} CPUs; start Ray with more (ray.init(num_cpus=...)) or add nodes"
            )
        return Placement("cpu", {"num_cpus": cpus_per_tower})


class ModelParallelAlexNet:
    """AlexNet with each tower in its own Ray actor and a coordinator actor for the exchanges.

    Keywords beyond the optimiser's are NetConfig fields (width, image_size, towers, init, layers).
    cpus_per_tower sets each CPU tower's cores and threads; dtype is float32 or float64; tf32 lets
    CUDA towers use TensorFloat-32 (faster, no longer equal to the reference at 1e-5).
    start_timeout is how long to wait for the towers to be placed and started (an autoscaling
    cluster may be adding a node); past it a RuntimeError says what they need and what is free.
    keep_freed_memory has each tower's allocator keep what it frees for the next step (glibc;
    5-12% faster steps on CPU, for a step's peak memory staying resident); False returns it.
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
        cpus_per_tower: int = 1,
        dtype: torch.dtype = torch.float32,
        tf32: bool = False,
        start_timeout: float = 600.0,
        keep_freed_memory: bool = True,
        **config,
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.config = NetConfig(num_classes=num_classes, dropout=dropout, **config)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.lr, self.seed, self.steps, self.dtype = lr, seed, 0, dtype
        ensure_ray()
        self.placement = Placement.plan(self.config.towers, cpus_per_tower)
        worker_cls = ray.remote(TowerWorker)
        self._workers = [
            worker_cls.options(**self.placement.actor_options).remote(
                self.config,
                t,
                seed=seed,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                threads=cpus_per_tower,
                dtype=dtype,
                tf32=tf32,
                keep_freed_memory=keep_freed_memory,
            )
            for t in range(self.config.towers)
        ]
        # The coordinator only routes references and computes the loss: it needs no core of its own.
        self._coordinator = ray.remote(Coordinator).options(num_cpus=0).remote(self._workers, self.config)
        self._graph, self._graph_lock = None, threading.Lock()
        try:
            self.towers = ray.get([w.describe.remote() for w in self._workers], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"the {self.config.towers} towers did not start within {start_timeout:g} s: each needs "
                f"{self.placement.actor_options}, and the cluster has {_free_devices()} free; "
                "shut down another model (engine.shutdown()) or add nodes"
            ) from None

    # --- input checks -------------------------------------------------------------------------
    def _images(self, images) -> tuple[list, int]:
        images = self._check_images(images)
        # Boxed in a list so the coordinator receives the reference, and the pixels go only to the towers.
        return [ray.put(ObjectStoreExchange.send(images))], images.shape[0]

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

    def _labels(self, labels, batch: int) -> np.ndarray:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.shape != (batch,):
            raise ValueError(f"labels must be {batch} integer class indices, got {labels.dtype} {list(labels.shape)}")
        if batch and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"labels must be in [0, {self.config.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        return labels.to(torch.long).numpy()

    # --- training -----------------------------------------------------------------------------
    def _batch(self, images, labels, dropout_seed: Optional[int]) -> tuple[list, np.ndarray, int]:
        """Checked and uploaded inputs of the next step; dropout masks default to a seed per step."""
        boxed, batch = self._images(images)
        if dropout_seed is None:
            dropout_seed = derive_seed(self.seed, "step", self.steps)
        return boxed, self._labels(labels, batch), dropout_seed

    def forward_backward(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """Loss of one batch, leaving its gradients in the towers (see gradients(), apply_update())."""
        return ray.get(self._coordinator.forward_backward.remote(*self._batch(images, labels, dropout_seed)))

    def apply_update(self) -> None:
        ray.get(self._coordinator.apply_update.remote(self.lr))
        self.steps += 1

    def zero_grad(self) -> None:
        """Drop gradients accumulated by forward_backward without applying them."""
        self._gather("abandon_step")

    def train_step(self, images, labels, dropout_seed: Optional[int] = None) -> float:
        """One SGD step on a batch; returns its loss (before the update)."""
        return ray.get(self.submit_step(images, labels, dropout_seed))

    def submit_step(self, images, labels, dropout_seed: Optional[int] = None, with_stats: bool = False):
        """Start one SGD step and return at once: an ObjectRef to its loss (and its timings, with_stats).

        Steps run in the order submitted. Submitting the next batch before the current step ends
        keeps the towers busy while this process prepares and uploads images.
        """
        boxed, labels, dropout_seed = self._batch(images, labels, dropout_seed)
        self.steps += 1
        return self._coordinator.train_step.remote(boxed, labels, self.lr, dropout_seed, with_stats)

    def predict(self, images) -> torch.Tensor:
        """Logits in eval mode (no dropout), through the compiled inference graph (made on first use)."""
        images = self._check_images(images)
        with self._graph_lock:
            if self._graph is None:
                self._graph = compile_inference(self._workers, len(self.config.segments))
            try:
                outputs = ray.get(self._graph.execute(ObjectStoreExchange.send(images)))
            except Exception:
                self._drop_graph()  # a failed execution can leave the channels unusable: rebuild next time
                raise
        return torch.cat([torch.from_numpy(np.array(o)) for o in outputs], dim=1)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            graph, self._graph = self._graph, None
            try:
                graph.teardown()
            except Exception:  # already broken; the actors will be replaced or killed anyway
                pass

    def take_stats(self) -> dict:
        """Per-tower compute and exchange timings and bytes since the last call, and the coordinator's time."""
        return ray.get(self._coordinator.take_stats.remote())

    # --- weights ------------------------------------------------------------------------------
    def gradients(self) -> OrderedDict:
        per_tower = [{k: torch.from_numpy(np.array(v)) for k, v in g.items()} for g in self._gather("gradients")]
        return merge_state_dicts(per_tower, self.config)

    def state_dict(self) -> OrderedDict:
        per_tower = [{k: torch.from_numpy(np.array(v)) for k, v in s.items()} for s in self._gather("get_state")]
        return merge_state_dicts(per_tower, self.config)

    def load_state_dict(self, state: dict) -> None:
        """Load canonical weights. The optimiser's momentum starts again from zero: it belonged to other weights."""
        pieces = split_state_dict(state, self.config)
        ray.get([w.set_state.remote({k: v.numpy() for k, v in p.items()}) for w, p in zip(self._workers, pieces)])

    def optimizer_state(self) -> list:
        """Each tower's optimiser state (momentum buffers), for checkpoints."""
        return self._gather("get_optimizer_state")

    def load_optimizer_state(self, per_tower: list) -> None:
        if len(per_tower) != len(self._workers):
            raise ValueError(f"optimizer state holds {len(per_tower)} towers, this model has {len(self._workers)}")
        ray.get([w.set_optimizer_state.remote(s) for w, s in zip(self._workers, per_tower)])

    def _gather(self, method: str) -> list:
        return ray.get([getattr(w, method).remote() for w in self._workers])

    def shutdown(self) -> None:
        self._drop_graph()
        for actor in [self._coordinator, *self._workers]:
            ray.kill(actor)
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
