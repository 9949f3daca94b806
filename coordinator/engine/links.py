"""The process groups that link the towers, and the flagged collectives that run over them.

Each tower belongs to two groups of torch.distributed (Gloo on CPUs and on a shared GPU, NCCL
where each tower has a GPU of its own): its pair (the towers of one model, for the exchanges)
and its replicas (the same tower of every data-parallel group, for the gradients' all-reduce).
The coordinator forms them in generations: tower 0 of a group hosts a fresh rendezvous store,
and every member leaves its old group and joins the new one, a replaced tower like the others.

Every collective carries one more value, a flag. A tower whose step fails between two
collectives, by an error of its own, plays out the rest of the step's collectives with the flag
raised (Link.play_out), so that its peers end the step at once, at the same collective, instead
of waiting for it until the timeout; then no group is left half-way. A peer that dies breaks the
group (its sockets close, the collective fails at once); a peer that hangs fails it after the
timeout. A broken group refuses every collective until it is formed again.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Optional

import ray
import torch
import torch.distributed as dist

from coordinator.engine.host_group import HostGroup, NoRoom
from towers import NetConfig

log = logging.getLogger(__name__)

# How long, by default, a tower waits for its peers in a collective before the step fails.
EXCHANGE_TIMEOUT = 120.0
# How long forming a group waits for every member to join: rendezvous, and a tower still finishing
# the call of a failed step. Longer than a step's exchanges may wait, which tests set to seconds.
JOIN_TIMEOUT = 60.0


class ExchangeError(RuntimeError):
    """A collective that could not complete: a peer that is late, failed or gone."""


class PeerFailed(ExchangeError):
    """A peer raised the flag: its step failed by an error of its own, which it reports itself."""


def error_summary(error: BaseException) -> str:
    """The first line of an error, without Ray's wrapping or colour codes."""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


@dataclass(frozen=True)
class ExchangePlan:
    """Where the towers exchange and what, from the layer table: the coordinator makes it and
    hands it to every tower with its groups."""

    points: tuple[str, ...]  # the layers that see every tower, in forward order: conv3, fc6, fc7, fc8
    stages: tuple[str, ...]  # the segments around them: conv1-conv2, conv3-conv5, fc6, fc7, fc8
    piece: tuple[int, ...]  # at each point, the values one tower sends per sample
    classes: tuple[int, ...]  # each tower's share of the logits
    towers: int
    backend: str  # "gloo" or "nccl"
    timeout: float  # seconds a collective waits for the peers
    shared_memory: bool = True  # towers on one host exchange through it (host_group.py), where Gloo would

    @staticmethod
    def of(
        config: NetConfig, backend: str, timeout: float = EXCHANGE_TIMEOUT, shared_memory: bool = True
    ) -> "ExchangePlan":
        before = [segment[-1] for segment in config.segments[:-1]]  # each point's input is made by these
        splits = {s.out_split for s in before}
        if any(len(set(split)) > 1 for split in splits):
            raise ValueError(f"every exchanged layer must split evenly over the {config.towers} towers")
        return ExchangePlan(
            points=tuple(segment[0].name for segment in config.segments[1:]),
            stages=config.stage_names,
            piece=tuple(s.out_split[0] * s.out_size**2 for s in before),
            classes=config.shapes[-1].out_split,
            towers=config.towers,
            backend=backend,
            timeout=timeout,
            shared_memory=shared_memory,
        )

    def pair_schedule(self, batch: int, backward: bool) -> list[tuple[str, int]]:
        """The pair's collectives in a call on `batch` samples: (op, values each tower sends)."""
        gathers = [("all_gather", batch * n) for n in self.piece] + [("all_gather", batch * max(self.classes))]
        scatters = [("reduce_scatter", self.towers * batch * n) for n in reversed(self.piece)]
        return gathers + (scatters if backward else [])


def host_store() -> tuple[dist.TCPStore, tuple[str, int]]:
    """A fresh rendezvous store on this node, for a group's next generation to meet at, and its address."""
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_seconds(JOIN_TIMEOUT))
    return store, (host, store.port)


def meeting_store(own: Optional[dist.TCPStore], address: tuple[str, int], rank: int, generation: str) -> dist.Store:
    """The store a rank joins a generation through: rank 0 its own (host_store), the others the
    one at `address`. Prefixed by the generation, so a straggler of another generation meets nobody."""
    store = own if rank == 0 else dist.TCPStore(*address, is_master=False, timeout=_seconds(JOIN_TIMEOUT))
    return dist.PrefixStore(generation, store)


class Link:
    """One tower's place in a group of towers, and the group's collectives as this tower runs them.

    `member` names the others in messages: "tower" in a pair, "group" among replicas. A link
    of size 0 has not joined a group yet, and refuses every collective.
    """

    def __init__(self, name: str, member: str, backend: str = "gloo", timeout: float = EXCHANGE_TIMEOUT, size: int = 0):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        self.name, self.member, self.backend, self.timeout = name, member, backend, timeout
        self.rank, self.size = 0, size  # 0: not joined yet
        self.group = None
        self.broken: Optional[str] = None  # why the group may not be used until it is formed again
        self.schedule: list[tuple[str, int]] = []  # this call's collectives: (op, values sent)
        self.done = 0  # of them
        self.dtype = torch.float32
        self._flags: list[torch.Tensor] = []  # NCCL's, read at the end of the call
        self._store = None

    def host(self) -> tuple[str, int]:
        """Rank 0: a fresh store for the next generation to meet at (its address)."""
        self._store, address = host_store()
        return address

    def join(
        self, address: tuple[str, int], rank: int, size: int, generation: int, timeout: float, one_host: bool
    ) -> None:
        """Leave the old group, if any, and join generation `generation` of `size` members.
        Members on `one_host` exchange through shared memory (host_group.py), unless over NCCL."""
        self.rank, self.size, self.timeout = rank, size, timeout
        self.group, self.broken, self.schedule, self.done = None, None, [], 0
        if size == 1:
            return
        name = f"{self.name}-{generation}"
        store = meeting_store(self._store, address, rank, name)
        if one_host and self.backend == "gloo":
            self.group = HostGroup(store, rank, size, f"{address[1]}-{name}", timeout)
            return
        make = dist.ProcessGroupNCCL if self.backend == "nccl" else dist.ProcessGroupGloo
        self.group = make(store, rank, size, _seconds(JOIN_TIMEOUT))
        self.group.set_timeout(_seconds(timeout))  # joining waits for stragglers; an exchange no longer than this

    @property
    def kind(self) -> str:
        """What carries this link's collectives: shared memory, gloo or nccl."""
        return "shared memory" if isinstance(self.group, HostGroup) else self.backend

    @property
    def peers(self) -> list[int]:
        return [r for r in range(self.size) if r != self.rank]

    def expect(self, schedule: list[tuple[str, int]], dtype: torch.dtype) -> None:
        """The collectives the coming call runs, in order (what play_out finishes after a failure)."""
        self.schedule, self.done, self.dtype = list(schedule) if self.size > 1 else [], 0, dtype

    # --- the collectives: `send` ends with the flag -----------------------------------------------
    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """Every member's `send`, (size, n + 1) in rank order; raises PeerFailed on a raised flag."""
        out = self._run("all_gather", send, what).view(self.size, -1)
        self._check(out[:, -1], what)
        return out.to(send.device, non_blocking=True)

    def reduce_scatter(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """`send` is (size, n + 1), a row for each member: the sum over members of this one's row."""
        out = self._run("reduce_scatter", send.reshape(-1), what)
        self._check(out[-1:], what)
        return out.to(send.device, non_blocking=True)

    def all_reduce(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """The sum of every member's `send`."""
        out = self._run("all_reduce", send, what)
        self._check(out[-1:], what)
        return out.to(send.device, non_blocking=True)

    def _run(self, op: str, send: torch.Tensor, what: str) -> torch.Tensor:
        if self.broken:
            raise ExchangeError(f"{what} was refused: the group broke earlier ({self.broken}); it must be formed again")
        if self.size == 0:
            raise ExchangeError(
                f"{what} was refused: this tower has not joined its {self.name} (the coordinator links them)"
            )
        self.done += 1
        if self.size == 1:
            return send  # every collective of one member hands it what it sent
        wire = send if self.backend == "nccl" else send.cpu()  # Gloo moves host memory; a no-op on a CPU tower
        start, others = time.perf_counter(), f"{self.member}(s) {self.peers}"
        try:
            if isinstance(self.group, HostGroup):
                return getattr(self.group, op)(wire)
            if op == "all_gather":
                out = wire.new_empty(self.size * wire.numel())
                work = self.group._allgather_base(out, wire)
            elif op == "reduce_scatter":
                out = wire.new_empty(wire.numel() // self.size)
                work = self.group._reduce_scatter_base(out, wire)
            else:
                out, work = wire, self.group.allreduce([wire])
            work.wait(_seconds(self.timeout))
            return out
        except Exception as error:
            self.broken = f"{what} failed"
            late = getattr(error, "late", False) or "timed out" in str(error).lower()
            if late or time.perf_counter() - start >= self.timeout:
                raise ExchangeError(f"{what} timed out after {self.timeout:g} s waiting for {others}") from None
            if isinstance(error, NoRoom):
                raise ExchangeError(f"{what} failed: {error}") from None
            raise ExchangeError(f"{what} failed ({others} gone?): {error_summary(error)}") from error

    def _check(self, flags: torch.Tensor, what: str) -> None:
        if (
            flags.device.type != "cpu"
        ):  # NCCL: read once at the end of the call (check_flags), not a synchronisation each
            self._flags.append(flags)
        elif bool(flags.any()):
            who = (
                f"{self.member}(s) {[r for r, f in enumerate(flags.tolist()) if f]}"
                if len(flags) > 1
                else f"a {self.member}"
            )
            raise PeerFailed(f"{what}: {who} failed in this step and ended it")

    def check_flags(self) -> None:
        """GPU collectives: raise PeerFailed if any of this call's flags was raised (one synchronisation)."""
        flags, self._flags = self._flags, []
        if flags and bool(torch.cat([f.reshape(-1) for f in flags]).any()):
            raise PeerFailed(f"a {self.member} of this tower's {self.name} failed in this step and ended it")

    def play_out(self) -> None:
        """After this tower's own failure: the rest of this call's collectives, flag raised, pieces
        empty, so that the peers end the step at the same collective. Not on a broken group."""
        device = torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")
        while not self.broken and self.group is not None and self.done < len(self.schedule):
            op, values = self.schedule[self.done]
            rows = self.size if op == "reduce_scatter" else 1
            send = torch.zeros(rows, values // rows + 1, dtype=self.dtype, device=device)
            send[:, -1] = 1
            try:
                self._run(op, send.reshape(-1), f"{self.name}: playing out")
            except ExchangeError:
                break
        self.schedule, self.done, self._flags = [], 0, []


def _seconds(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


# --- choosing the backend: the engine's `transport` ---------------------------------------------
TRANSPORT_CHOICES = ("auto", "gloo", "nccl")
# Transports of the engine before its one-call step (2026-12), still named by saved recipes and checkpoints.
RETIRED_TRANSPORTS = ("object_store", "collective")


def check_transport(name: str) -> str:
    """A transport the engine takes: one of TRANSPORT_CHOICES, or a retired one (read as auto)."""
    if name not in TRANSPORT_CHOICES + RETIRED_TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}: choose one of {', '.join(TRANSPORT_CHOICES)}")
    return name


def backend_for(transport: str, devices: str) -> tuple[str, bool]:
    """The torch.distributed backend for towers placed on `devices` (a Placement kind: gpu,
    shared-gpu, cpu), and whether towers on one host exchange through shared memory instead.

    auto is NCCL where each tower has a GPU of its own (NCCL takes one rank per GPU), else shared
    memory between towers on one host and Gloo between hosts; gloo is Gloo everywhere. A retired
    transport is read as auto, and says so in the log."""
    if check_transport(transport) in RETIRED_TRANSPORTS:
        log.warning("transport %r was retired with the one-call step (docs/performance.md): using auto", transport)
        transport = "auto"
    if transport == "auto":
        return ("nccl", False) if devices == "gpu" else ("gloo", True)
    if transport == "nccl" and devices != "gpu":
        raise ValueError(
            f"transport nccl needs a GPU for each tower, and these towers are on {devices}: use auto or gloo"
        )
    return transport, False
