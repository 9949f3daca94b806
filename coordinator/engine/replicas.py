"""Data parallelism over model-parallel groups: the all-reduce of each tower's gradients.

R groups of two towers each take 1/R of a step's batch. A group's loss is the mean over its
shard, so the mean of the groups' gradients is the gradient of the whole batch's mean loss: the
single-process step. After it every group applies the same update, and the groups stay equal.

Tower t of every group forms one process group of R ranks (the rank is the group's number), in
generations like the transport's pairs (transport/collective.py): forming it again after a
tower is replaced is the same call. It is a process group of its own, not the process's default
group, which the collective transport may use for the pair. Gloo on CPUs and on a shared GPU
(NCCL takes one rank per device), NCCL when each tower has a GPU of its own.
"""

from __future__ import annotations

import datetime
import time
from typing import Sequence

import ray
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from coordinator.engine.transport.collective import JOIN_TIMEOUT, host_store, meeting_store


class ReplicaGroup:
    """Tower side: this tower's place among its replicas, and the all-reduce of its gradients."""

    def __init__(self, backend: str = "gloo", timeout: float = 60.0):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        self.backend, self.timeout = backend, timeout
        self.size = 1
        self._group = None
        self._store = None
        self.seconds, self.bytes = 0.0, 0  # spent in all-reduces, and what they carried, since last read

    def host(self) -> tuple[str, int]:
        """Rank 0: a fresh store for the next generation to meet at (its address)."""
        self._store, address = host_store()
        return address

    def join(self, address: tuple[str, int], rank: int, size: int, generation: int) -> None:
        """Leave the old group, if any, and join generation `generation` of `size` replicas."""
        store = meeting_store(self._store, address, rank, f"replicas-{generation}")
        make = dist.ProcessGroupNCCL if self.backend == "nccl" else dist.ProcessGroupGloo
        self._group = make(store, rank, size, datetime.timedelta(seconds=self.timeout))
        self.size = size

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the replicas, in place: one all-reduce of all of them."""
        if self.size == 1 or not tensors:
            return
        if self._group is None:
            raise RuntimeError("this tower has not joined its replicas: the model must link them first")
        start = time.perf_counter()
        flat = _flatten_dense_tensors(list(tensors))
        wire = flat if self.backend == "nccl" else flat.cpu()  # Gloo moves host memory; a no-op on CPU
        self._group.allreduce([wire]).wait()
        wire.div_(self.size)
        for tensor, mean in zip(tensors, _unflatten_dense_tensors(wire.to(flat.device), list(tensors))):
            tensor.copy_(mean)
        self.seconds += time.perf_counter() - start
        self.bytes += wire.numel() * wire.element_size()

    def take_stats(self) -> dict:
        stats = {"allreduce_seconds": self.seconds, "allreduce_bytes": self.bytes}
        self.seconds, self.bytes = 0.0, 0
        return stats


def in_groups(per_tower: list, towers: int) -> list[list]:
    """A list in tower order, group-major (tower i is tower i % T of group i // T), cut into each group's part."""
    return [per_tower[i : i + towers] for i in range(0, len(per_tower), towers)]


def link_replicas(groups: Sequence[Sequence], generation: int) -> None:
    """Coordinator side: form, for each tower index, the process group of that tower in every group."""
    if len(groups) < 2:
        return
    columns = list(zip(*groups))  # columns[t]: tower t of each group
    addresses = ray.get([column[0].host_replicas.remote() for column in columns], timeout=JOIN_TIMEOUT)
    joins = [tower.join_replicas.remote(address, rank, len(groups), generation)
             for column, address in zip(columns, addresses) for rank, tower in enumerate(column)]  # fmt: skip
    ray.get(joins, timeout=JOIN_TIMEOUT)
