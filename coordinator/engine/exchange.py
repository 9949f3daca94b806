"""The cross-tower exchanges of one tower's call, as autograd operations.

Where a layer of the table sees every tower (conv3, fc6, fc7, fc8), each tower needs every
tower's output. That is one collective, and its backward is the other, paired as Megatron-LM
pairs them (megatron/core/tensor_parallel/mappings.py):

  gather_from_towers   forward:  all-gather: every tower's piece, joined on the feature
                                 dimension in tower order;
                       backward: reduce-scatter: each tower's gradient for every piece, summed
                                 over the towers, each piece to the tower it came from.
  gather_logits        forward:  the same all-gather, of the last layer's outputs: each tower then
                                 computes the whole loss, the same in every tower;
                       backward: this tower's own columns of the loss's gradient (no exchange).
  average (replicas)   the all-reduce of a tower's gradients with the same tower of every other
                       data-parallel group, divided by their number.

So a tower runs a whole step in one call: forward, loss, one backward that runs every exchange
in reverse, and the update. The collectives go tower to tower over the groups in links.py.
Feature maps travel as (N, H, W, C), the towers' channels-last memory, so sending is a view.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from coordinator.engine.links import ExchangePlan, Link


class StepClock:
    """Where a call's time goes: each lap adds the time since the last one to a key. On a GPU the
    marks are CUDA events, read once at the end of the call (settle), not a synchronisation each."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.laps: list = []
        self.last = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, totals: dict, key) -> None:
        now = self._mark()
        if self.cuda:
            self.laps.append((totals, key, self.last, now))
        else:
            totals[key] += now - self.last
        self.last = now

    def settle(self) -> None:
        if self.laps:
            self.laps[-1][3].synchronize()
        for totals, key, start, end in self.laps:
            totals[key] += start.elapsed_time(end) / 1000.0
        self.laps = []


class StepExchange:
    """One call of a tower: its exchanges with its pair, its gradients' average with its
    replicas, and where its time went. Made by `exchanges`, which also ends it."""

    def __init__(
        self,
        plan: ExchangePlan,
        pair: Link,
        replicas: Link,
        tower: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        self.plan, self.pair, self.replicas, self.tower = plan, pair, replicas, tower
        self.dtype = dtype  # what the pair's exchanges carry (bf16 in bfloat16: towers.precision)
        self.clock = StepClock(device)
        self.compute = defaultdict(float)  # (stage, direction) -> s
        self.waited = defaultdict(float)  # (point, direction) -> s in the collective
        self.moved = defaultdict(int)  # (point, direction) -> bytes from other towers
        self.other = defaultdict(float)  # the replicas' all-reduce and the update: s, bytes

    def stats(self) -> dict:
        return {
            "compute_seconds": dict(self.compute),
            "exchange_seconds": dict(self.waited),
            "exchange_bytes": dict(self.moved),
            "allreduce_seconds": self.other["allreduce_seconds"],
            "allreduce_bytes": int(self.other["allreduce_bytes"]),
            "update_seconds": self.other["update_seconds"],
        }

    # --- what the tower calls -------------------------------------------------------------------
    def gather(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """gather_from_towers at `point` (towers.tower.Exchange)."""
        return _GatherFromTowers.apply(x.to(self.dtype), self, point)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return _GatherLogits.apply(logits.to(self.dtype), self)

    def backward_done(self) -> None:
        """The loss's backward has reached the image: the rest of it was the first stage's."""
        self.clock.lap(self.compute, (self.plan.stages[0], "backward"))

    def average(self, grads: Sequence[torch.Tensor]) -> None:
        """Each gradient replaced, in place, by its mean over the replicas: one all-reduce of them all."""
        if self.replicas.size == 1 or not grads:
            return
        send = torch.empty(sum(g.numel() for g in grads) + 1, dtype=grads[0].dtype, device=grads[0].device)
        offset = 0
        for g in grads:
            send[offset : offset + g.numel()].view_as(g).copy_(g)
            offset += g.numel()
        send[-1] = 0
        total = self.replicas.all_reduce(send, f"tower {self.tower}: the all-reduce of its gradients")
        offset = 0
        for g in grads:
            g.copy_(total[offset : offset + g.numel()].view_as(g)).div_(self.replicas.size)
            offset += g.numel()
        self.clock.lap(self.other, "allreduce_seconds")
        self.other["allreduce_bytes"] += (send.numel() - 1) * send.element_size()

    def updated(self) -> None:
        self.clock.lap(self.other, "update_seconds")

    def check_flags(self) -> None:
        """Before an update: raise if a peer's flag went up on a GPU collective (read here, once)."""
        self.pair.check_flags()
        self.replicas.check_flags()

    # --- the collectives' two sides ---------------------------------------------------------------
    def all_gather(self, x: torch.Tensor, point: str) -> torch.Tensor:
        k = self.plan.points.index(point)
        self.clock.lap(self.compute, (self.plan.stages[k], "forward"))
        wire = _as_wire(x)
        out = self.pair.all_gather(_flagged(wire.unsqueeze(0))[0], f"tower {self.tower}: the all-gather at {point}")
        pieces = out[:, :-1].view(self.pair.size, *wire.shape)
        joined = pieces.movedim(0, -2).reshape(
            *wire.shape[:-1], -1
        )  # (N, ..., towers x C): each tower's C side by side
        self.clock.lap(self.waited, (point, "forward"))
        self.moved[(point, "forward")] += (self.pair.size - 1) * wire.numel() * wire.element_size()
        return _from_wire(joined)

    def reduce_scatter(self, grad: torch.Tensor, point: str) -> torch.Tensor:
        k = self.plan.points.index(point)
        self.clock.lap(self.compute, (self.plan.stages[k + 1], "backward"))
        towers = self.pair.size
        pieces = _as_wire(grad).unflatten(-1, (towers, -1)).movedim(-2, 0)  # (towers, N, ..., C): a row for each tower
        own = self.pair.reduce_scatter(_flagged(pieces), f"tower {self.tower}: the reduce-scatter at {point}")[
            :-1
        ].view(pieces.shape[1:])
        self.clock.lap(self.waited, (point, "backward"))
        self.moved[(point, "backward")] += (towers - 1) * own.numel() * own.element_size()
        return _from_wire(own)

    def all_gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        self.clock.lap(self.compute, (self.plan.stages[-1], "forward"))
        classes, widest = self.plan.classes, max(self.plan.classes)
        padded = torch.nn.functional.pad(logits, (0, widest - logits.shape[1]))  # uneven splits travel padded
        out = self.pair.all_gather(
            _flagged(padded.unsqueeze(0))[0], f"tower {self.tower}: the all-gather of the logits"
        )
        pieces = out[:, :-1].view(self.pair.size, *padded.shape)
        joined = torch.cat([pieces[t, :, :n] for t, n in enumerate(classes)], dim=1)
        self.clock.lap(self.waited, ("logits", "forward"))
        self.moved[("logits", "forward")] += (self.pair.size - 1) * padded.numel() * padded.element_size()
        return joined


class _GatherFromTowers(torch.autograd.Function):
    """Forward: all-gather of every tower's x, joined on dim 1 in tower order. Backward:
    reduce-scatter, the sum over the towers of each one's gradient for this tower's piece."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: StepExchange, point: str) -> torch.Tensor:
        ctx.step, ctx.point = step, point
        return step.all_gather(x, point)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.step.reduce_scatter(grad, ctx.point), None, None


class _GatherLogits(torch.autograd.Function):
    """Forward: all-gather of the logits, each tower's classes in tower order. Backward: this
    tower's own columns; every tower computed the same loss from the same logits, so the others'
    columns are theirs to send back, and nothing needs to travel."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, step: StepExchange) -> torch.Tensor:
        classes = step.plan.classes
        ctx.columns = (sum(classes[: step.tower]), logits.shape[1])
        return step.all_gather_logits(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, width = ctx.columns
        return grad[:, start : start + width], None


@contextmanager
def exchanges(
    plan: ExchangePlan,
    pair: Link,
    replicas: Link,
    tower: int,
    device: torch.device,
    *,
    batch: int = 0,
    dtype: torch.dtype = torch.float32,
    gradients: torch.dtype = torch.float32,
    backward: bool = False,
    update: bool = False,
    parameters: int = 0,
) -> Iterator[StepExchange]:
    """One call's exchanges. `batch` samples through the pair (0: none), as `dtype`, backward too if
    asked; with `update`, an all-reduce of `parameters` gradient values (as `gradients`) among the
    replicas. A call that fails plays out the rest of its collectives, flag raised, so its peers
    end at once (links.py)."""
    pair.expect(plan.pair_schedule(batch, backward) if batch else [], dtype)
    replicas.expect([("all_reduce", parameters)] if update else [], gradients)
    step = StepExchange(plan, pair, replicas, tower, device, dtype)
    try:
        yield step
        step.check_flags()
    except BaseException:
        pair.play_out()
        replicas.play_out()
        raise
    finally:
        step.clock.settle()


def _flagged(x: torch.Tensor) -> torch.Tensor:
    """x, (rows, ...), copied into a (rows, values + 1) buffer whose last column, the flag, is
    lowered: what a flagged collective sends (links.py)."""
    send = torch.empty(x.shape[0], x[0].numel() + 1, dtype=x.dtype, device=x.device)
    send[:, :-1].view(x.shape).copy_(x)
    send[:, -1] = 0
    return send


def _as_wire(x: torch.Tensor) -> torch.Tensor:
    """Feature maps as (N, H, W, C): a view of the channels-last memory they are computed in."""
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _from_wire(x: torch.Tensor) -> torch.Tensor:
    """Back to (N, C, H, W), still channels-last in memory."""
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x
