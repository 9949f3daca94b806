"""The collective transport: a torch.distributed process group among the tower actors.

Exchanged tensors go tower to tower in one collective per exchange point, NCCL between GPUs and
Gloo otherwise, never through the object store or the coordinator. The coordinator still routes
one small marker per tower and call (what `send` returns: the tensor's shape). A tower waits for
its peers' markers before it enters the collective, so a peer that failed or died ends the step
at once instead of leaving the others in the collective until the timeout.

What does not go tower to tower keeps the object store path (this class extends it): the batch
from the driver, the logits for the loss and their gradient, and the inference graph, whose
intermediate activations stay on the device (NCCL channels) when the towers are on GPUs.

Rejoining: the group is formed in generations. `connect` makes tower 0 host a fresh rendezvous
store, and every tower leaves its old group and joins the new one. A replaced tower joins the
next generation like the others, so the fault-tolerance path needs nothing else. After any
failed collective a tower refuses further exchanges until the group is formed again.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Optional, Sequence

import ray
import torch
import torch.distributed as dist

from coordinator.engine.transport.base import (
    EXCHANGE_TIMEOUT,
    Exchange,
    ExchangeError,
    Received,
    error_summary,
    from_wire,
    to_wire,
)
from coordinator.engine.transport.object_store import ObjectStoreTransport


# How long forming a group waits for every tower to join: rendezvous, and a tower still finishing
# the calls of a failed step. Longer than a step's exchanges may wait, which tests set to seconds.
JOIN_TIMEOUT = 60.0


class CollectiveTransport(ObjectStoreTransport):
    name = "collective"

    def __init__(self, backend: str = "gloo", timeout: float = EXCHANGE_TIMEOUT):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        super().__init__(timeout)
        self.backend = backend
        # The inference graph's activations stay on the GPUs, over Ray's NCCL channels.
        self.graph_channel = "accelerator" if backend == "nccl" else None
        # Tower side, in each tower's own copy of the transport:
        self.outbox: list[torch.Tensor] = []  # what the tower sent since its last exchange, in order
        self.rank: Optional[int] = None
        self.broken: Optional[str] = None  # why the group may not be used until it is formed again
        self._store = None

    @classmethod
    def for_devices(cls, devices: str, timeout: float = EXCHANGE_TIMEOUT) -> "CollectiveTransport":
        return cls("nccl" if devices == "gpu" else "gloo", timeout)  # NCCL takes one rank per GPU

    def describe(self) -> str:
        return f"{self.name} ({self.backend})"

    # --- forming the group -----------------------------------------------------------------------
    def connect(self, towers: Sequence, generation: int) -> None:
        address = ray.get(towers[0].host_rendezvous.remote(), timeout=JOIN_TIMEOUT)
        ray.get([t.join_exchange.remote(address, generation, len(towers)) for t in towers], timeout=JOIN_TIMEOUT)

    def host_rendezvous(self) -> tuple[str, int]:
        """Tower 0: a fresh store for the next generation to meet at (its address)."""
        self._store, address = host_store()
        return address

    def join(self, address: tuple[str, int], rank: int, world: int, generation: int) -> None:
        """Tower: leave the old group, if any, and join generation `generation` of `world` towers."""
        if dist.is_initialized():
            dist.destroy_process_group()
        store = meeting_store(self._store, address, rank, f"generation-{generation}")
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world, timeout=_seconds(JOIN_TIMEOUT))
        self.rank, self.broken, self.outbox = rank, None, []

    def reset(self) -> None:
        """Tower: forget what was sent for an abandoned step."""
        self.outbox = []

    # --- forward: all-gather ---------------------------------------------------------------------
    # all_gather and reduce_scatter route the markers as the object store routes its arrays.

    def send(self, tensor: torch.Tensor) -> tuple[int, ...]:
        wire = to_wire(tensor)
        if self.backend == "gloo":
            wire = wire.cpu()  # Gloo moves host memory; a no-op for CPU towers
        self.outbox.append(wire)
        return tuple(wire.shape)

    def receive(self, delivered: Any, own: int, device: torch.device, point: str = "") -> Received:
        if not isinstance(delivered, Exchange):
            return super().receive(delivered, own, device, point)  # the batch, or the loss's gradient
        start = time.perf_counter()
        what = delivered.describe(own, point)
        if self.broken:
            raise ExchangeError(f"{what} was refused: the group broke earlier ({self.broken}); it must be formed again")
        if self.rank is None:
            raise ExchangeError(f"{what} was refused: this tower has not joined a group (Transport.connect)")
        shapes = self.await_sent(delivered, own, point)  # a peer that failed ends the step here, not in the collective
        if len(set(shapes)) > 1:
            raise ExchangeError(f"{what}: the towers' pieces differ in shape ({shapes}); collectives need equal splits")
        sent, self.outbox = self.outbox, []
        try:
            if delivered.op == "all_gather":
                (mine,) = sent
                pieces = [torch.empty_like(mine) for _ in shapes]
                work = dist.all_gather(pieces, mine, async_op=True)
                foreign = sum(p.nbytes for t, p in enumerate(pieces) if t != own)
            else:
                pieces = [torch.empty_like(sent[own])]
                work = dist.reduce_scatter(pieces[0], sent, async_op=True)
                foreign = pieces[0].nbytes * (len(sent) - 1)
            work.wait(timeout=_seconds(self.timeout))  # a peer that stops answering fails the step
        except Exception as error:
            self.broken = f"{what} failed"
            raise ExchangeError(f"{what} failed: {error_summary(error)}") from error
        wait = time.perf_counter() - start
        return Received([from_wire(p).to(device) for p in pieces], wait, foreign, reduced=delivered.op == "reduce_scatter")


def host_store() -> tuple[dist.TCPStore, tuple[str, int]]:
    """A fresh rendezvous store on this node, for a process group's next generation to meet at,
    and its address, which the other ranks are given."""
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_seconds(JOIN_TIMEOUT))
    return store, (host, store.port)


def meeting_store(own: Optional[dist.TCPStore], address: tuple[str, int], rank: int, generation: str) -> dist.Store:
    """The store a rank joins a generation through: rank 0 its own (host_store), the others the
    one at `address`. Prefixed by the generation, so a straggler of another generation meets nobody."""
    store = own if rank == 0 else dist.TCPStore(*address, is_master=False, timeout=_seconds(JOIN_TIMEOUT))
    return dist.PrefixStore(generation, store)


def _seconds(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)

