"""The towers' calls as the driver submits and collects them: one call per tower per step.

Calls whose collectives meet (a step, an inference pass) must reach every tower in one order:
the engine submits them under one lock, from this process. A call in flight is a Pending; its
result() waits for every tower's part, and the first failure ends the wait (a peer that hangs
must not hold it). Then the coordinator probes the towers: one that died or hangs is named in a
TowerFailure; otherwise the tower's own error is raised, not its peers' PeerFailed. Every call
in flight fails with it: the towers ran them after the one that failed.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import numpy as np
import ray

from coordinator.engine.coordinator_actor import in_groups
from coordinator.engine.failures import TowerFailure
from coordinator.engine.links import PeerFailed, error_summary


class Pending:
    """A call of the towers in flight (what submit_step returns): result() waits for it and gives
    its value, or raises its failure."""

    def __init__(
        self, calls: list, value: Callable[[list], Any], collect: Callable[["Pending"], None], before_update: bool
    ):
        self.calls, self.value, self.before_update = calls, value, before_update
        self._collect = collect
        self.results: list | None = None
        self.failure: BaseException | None = None

    def done(self, timeout: float = 0.0) -> bool:
        """Whether every tower has answered (waiting up to `timeout` seconds)."""
        if self.results is not None or self.failure is not None:
            return True
        ready, _ = ray.wait(self.calls, num_returns=len(self.calls), timeout=timeout)
        return len(ready) == len(self.calls)

    def result(self):
        if self.results is None and self.failure is None:
            self._collect(self)
        if self.failure is not None:
            raise self.failure
        return self.value(self.results)

    def discard(self, wait: float = 2.0) -> None:
        """Drop a call after a failure. Its error, when it comes within `wait` seconds, is read
        here, so that Ray does not log it as unhandled with a second traceback."""
        if self.done(wait):
            try:
                self.result()
            except Exception:
                pass  # the failure being recovered from, seen again


class TowerCalls:
    """An engine's calls of its towers: submitted in one order, collected with their timings,
    their failures named by the coordinator. `towers` and `coordinator` give the engine's
    actors of the moment (the failure policy replaces them); `link` has the coordinator link the towers again."""

    def __init__(self, towers: Callable[[], list], coordinator: Callable[[], Any], link: Callable[[], None]):
        self.towers, self.coordinator, self.link = towers, coordinator, link
        self.lock = threading.RLock()  # calls whose collectives meet go to every tower in one order
        self.in_flight: list[Pending] = []
        self.relink = False  # a call failed with towers lost: link them again before the next
        self.unsettled: list = []  # calls of failed steps still running on a tower that hung: read once they end
        self.stats, self.count = [no_stats() for _ in towers()], 0

    def submit(self, calls: list, method: str, value, stats=lambda result: result[1], before_update=True) -> Pending:
        """Submit `method` to each (tower, args) of `calls` (towers 0, 1, ... in order)."""
        with self.lock:
            self.unsettled = settle(self.unsettled)
            if self.relink:
                self.link()
            refs = [getattr(tower, method).remote(*args) for tower, args in calls]
            pending = Pending(refs, value, lambda p: self._collect(p, stats), before_update)
            self.in_flight.append(pending)
            self.count += len(refs)
        return pending

    def take_stats(self) -> tuple[list[dict], int]:
        """Each tower's timings since the last take, and how many calls were made."""
        with self.lock:
            stats, self.stats = self.stats, [no_stats() for _ in self.towers()]
            count, self.count = self.count, 0
        return stats, count

    def _collect(self, pending: Pending, stats) -> None:
        """Wait for a call (Pending.result): its results and timings, or its failure named."""
        error = first_failure(pending.calls)
        with self.lock:
            if pending.results is not None or pending.failure is not None:
                return  # settled meanwhile, by an earlier call's failure
            if error is not None:
                self._fail(pending, error)
                return
            pending.results = ray.get(pending.calls)
            self.in_flight.remove(pending)
            for t, outcome in enumerate(pending.results):  # calls go to towers 0, 1, ... in order
                add_stats(self.stats[t], stats(outcome))

    def _fail(self, pending: Pending, error: BaseException) -> None:
        """After a failed call: the coordinator probes the towers and names the lost ones, or
        forms their groups again; every call in flight fails with it."""
        cause = own_error(pending.calls, error)
        untouched = pending.before_update or not any(_succeeded(call) for call in pending.calls)
        try:
            ray.get(self.coordinator().diagnose.remote(error_summary(cause), untouched))
            failure = cause
        except ray.exceptions.RayTaskError as lost:
            self.relink, failure = True, lost.cause if isinstance(lost.cause, TowerFailure) else lost
        except ray.exceptions.RayActorError as gone:  # the coordinator itself: the failure policy replaces it
            self.relink, failure = True, gone
        for other in self.in_flight:  # but for those already ended well, the towers ran them after the failed one
            if other is not pending and other.done() and not any(not _succeeded(call) for call in other.calls):
                other.results = ray.get(other.calls)
                continue
            self.unsettled += settle(other.calls)
            other.failure = failure
        self.in_flight = []

    def close(self, wait: float) -> None:
        """Before the towers go: read the calls of failed steps that end within `wait` seconds."""
        with self.lock:
            self.unsettled = settle(self.unsettled, wait)


def _succeeded(call) -> bool:
    """Whether a call has ended well (a tower that ended a step updated; one that failed did not)."""
    ready, _ = ray.wait([call], timeout=0)
    if not ready:
        return False
    try:
        ray.get(call)
        return True
    except Exception:
        return False


def first_failure(calls: list, poll: float = 1.0) -> BaseException | None:
    """Wait for every call, or for the first to fail: its error (None when all succeeded). A call
    that hangs does not hold the wait: its peers fail within the exchange timeout, and every
    `poll` seconds the calls that ended are looked at."""
    while True:
        try:
            ray.get(calls, timeout=poll)
            return None
        except ray.exceptions.GetTimeoutError:
            pass
        except Exception as error:
            return error
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
        for call in ready:
            try:
                ray.get(call)
            except Exception as error:
                return error


def own_error(calls: list, error: BaseException) -> BaseException:
    """The error that ended a call: the first tower's own, rather than its peers' PeerFailed,
    unwrapped from Ray's RayTaskError."""
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
    errors = []
    for call in calls:
        if call in ready:
            try:
                ray.get(call)
            except Exception as failure:
                errors.append(failure)
    own = [e for e in errors if not isinstance(getattr(e, "cause", e), PeerFailed)]
    chosen = (own or errors or [error])[0]
    cause = getattr(chosen, "cause", None)
    return cause if isinstance(cause, BaseException) else chosen


def settle(calls: list, wait: float = 0.0) -> list:
    """Read what the calls that have answered (within `wait` seconds) returned, errors included,
    so that Ray does not log them as unhandled; returns the others."""
    if not calls:
        return []
    ready, rest = ray.wait(calls, num_returns=len(calls), timeout=wait)
    for call in ready:
        try:
            ray.get(call)
        except Exception:
            pass
    return rest


def agreed_loss(losses: list[float], towers: int) -> float:
    """The batch's loss: each group's, which its towers computed alike from the same logits,
    averaged over the groups (equal shards: the mean of their means)."""
    per_group = in_groups(losses, towers)
    for g, values in enumerate(per_group):
        if not all(_same(v, values[0]) for v in values):
            raise RuntimeError(f"the towers of group {g} disagree on the loss ({values}): their exchanges differ")
    return float(np.mean([values[0] for values in per_group]))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)


def no_stats() -> dict:
    return {
        "compute_seconds": {},
        "exchange_seconds": {},
        "exchange_bytes": {},
        "allreduce_seconds": 0.0,
        "allreduce_bytes": 0,
        "update_seconds": 0.0,
    }


def add_stats(total: dict, stats: dict) -> None:
    for name, value in stats.items():
        if isinstance(value, dict):
            for key, amount in value.items():
                total[name][key] = total[name].get(key, 0) + amount
        else:
            total[name] += value


def result(ref):
    """ray.get of a call, with a TowerFailure raised as itself: one readable line, not inside
    Ray's wrapper with the coordinator's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, TowerFailure):
            raise error.cause from None
        raise
