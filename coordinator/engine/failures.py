"""The failure policy: probe, decide, act. Training (training/loop.py) and serving (service/serving.py)
both call it when a call of the towers fails, and serving also when idle.

- **Probe**: which actors of an engine are dead or hung (a call to each tower, a ping of the
  coordinator, PROBE_SECONDS at most). The coordinator actor runs the same probe of the towers
  after every failed call (Coordinator.diagnose), and names the lost ones in a TowerFailure.
- **Decide** (FailurePolicy.decide, after Ray Train's FailurePolicy): RESTART when actors were
  lost and restarts are left; RAISE when the error is not a lost actor's, nothing was lost, or
  max_restarts recoveries were made already; NOOP when nothing failed and nothing was lost.
  A training run restarts from a healthy replica group's state when the step failed before any
  update and a group kept all its towers (FailurePolicy.healthy_group), else from its snapshot.
- **Act** (replace): new actors for the lost ones, linked in as the groups' next generation. They
  start from their initial weights: the caller then loads the state it goes on from (a snapshot,
  a group's weights, the version being served).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import ray

from coordinator.engine.links import error_summary

# How long a tower, or the coordinator, may take to answer a liveness check after a failed call.
PROBE_SECONDS = 10.0


class TowerFailure(RuntimeError):
    """A step that failed because towers died or stopped answering; `towers` are their indices.
    before_update: the step failed before any tower that is still there applied an update."""

    def __init__(self, message: str, towers: list[int], before_update: bool = False):
        super().__init__(message)
        self.towers, self.before_update = towers, before_update

    def __reduce__(self):  # Ray pickles it on its way to the driver
        return TowerFailure, (str(self), self.towers, self.before_update)


def unanswered(probes: list) -> dict[int, str]:
    """Which towers did not answer their probe (a call to each, in tower order), and why ("died")."""
    ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_SECONDS)
    lost = {}
    for t, probe in enumerate(probes):
        if probe not in ready:
            lost[t] = f"did not answer within {PROBE_SECONDS:g} s"
            continue
        try:
            ray.get(probe)
        except ray.exceptions.RayActorError:
            lost[t] = "died"
    return lost


def named(lost: dict[int, str]) -> str:
    """unanswered()'s towers as a phrase: "tower 1 died; tower 0 did not answer within 10 s"."""
    return "; ".join(f"tower {t} {why}" for t, why in lost.items())


@dataclass
class Lost:
    """What a probe found: the towers that are dead or hung (index -> what happened to it), whether
    the coordinator is ("died" or "hung"), and each as a report names it, e.g. "tower 1 (died; pid
    123 on host)" or, with replica groups, "group 1 tower 0 (...)"."""

    towers: dict[int, str] = field(default_factory=dict)
    coordinator: Optional[str] = None
    names: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.towers) or self.coordinator is not None

    def phrase(self) -> str:
        """As one phrase: "tower 1 died; the coordinator hung"."""
        coordinator = [f"the coordinator {self.coordinator}"] if self.coordinator else []
        return "; ".join([named(self.towers)] * bool(self.towers) + coordinator)


def probe(engine, error: Optional[BaseException] = None) -> Lost:
    """Which of the engine's actors are dead or hung (PROBE_SECONDS at most for the towers, as much
    for the coordinator); none are looked for after an error that no lost actor explains."""
    if error is not None and not from_lost_actor(error):
        return Lost()
    lost = Lost(unanswered([t.describe.remote() for t in engine.tower_actors]))
    per_group = engine.config.towers
    for t, why in lost.towers.items():
        old = engine.tower_info[t]
        name = f"tower {t}" if engine.replicas == 1 else "group {} tower {}".format(*divmod(t, per_group))
        lost.names.append(f"{name} ({why}; pid {old['pid']} on {old['host']})")
    try:
        ray.get(engine.coordinator.ping.remote(), timeout=PROBE_SECONDS)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
        lost.coordinator = "died" if isinstance(error, ray.exceptions.RayActorError) else "hung"
        lost.names.append(f"the coordinator ({lost.coordinator})")
    return lost


def from_lost_actor(error: BaseException) -> bool:
    """Whether an error can come from a dead or hung actor (then the engine is worth probing)."""
    return isinstance(error, (TowerFailure, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def failed_before_update(error: BaseException) -> bool:
    """Whether a failed step ended before any tower applied its update (TowerFailure.before_update)."""
    cause = getattr(error, "cause", error)  # through Ray's RayTaskError
    return isinstance(cause, TowerFailure) and cause.before_update


class FailureDecision(Enum):
    RESTART = "restart"  # replace the lost actors and go on
    RAISE = "raise"  # give up: the error is not a lost actor's, or the restarts are spent
    NOOP = "noop"  # nothing failed, nothing was lost


class FailurePolicy:
    """What to do about a failed call (or an idle probe): at most max_restarts restarts in a run."""

    def __init__(self, max_restarts: float = math.inf):
        self.max_restarts = max_restarts

    def decide(self, error: Optional[BaseException], lost: Lost, restarts: int = 0) -> FailureDecision:
        """From the error that ended a call (None: an idle probe), what the probe found, and the
        restarts made so far in the run."""
        if not lost:
            return FailureDecision.NOOP if error is None else FailureDecision.RAISE
        if error is not None and not from_lost_actor(error):
            return FailureDecision.RAISE
        return FailureDecision.RESTART if restarts < self.max_restarts else FailureDecision.RAISE

    def raised(self, error: BaseException, lost: Lost, restarts: int) -> BaseException:
        """What a RAISE raises: the error itself, or, with the restarts spent, one line that says so."""
        if not lost or not from_lost_actor(error):
            return error
        given_up = RuntimeError(
            f"{', '.join(lost.names)} lost after {restarts} recoveries already (max_restarts): {error_summary(error)}"
        )
        given_up.__cause__, given_up.__suppress_context__ = error, True  # as `raise ... from error`
        return given_up

    def healthy_group(self, error: BaseException, lost: Lost, replicas: int, towers: int) -> Optional[int]:
        """With replica groups (of `towers` towers each), after a step that failed before any update:
        a group that kept all its towers, whose weights and momentum every group can take (no step
        lost), or None."""
        if replicas == 1 or not failed_before_update(error):
            return None
        hit = {t // towers for t in lost.towers}
        return next((g for g in range(replicas) if g not in hit), None)


def replace(engine, lost: Lost) -> list[str]:
    """Act on a RESTART: new actors for the lost ones (a lost tower's is killed if it still runs),
    then the towers linked again. Returns what was replaced (Lost.names)."""
    for t in lost.towers:
        engine.restart_tower(t, relink=False)
    if lost.coordinator is not None:
        engine.restart_coordinator()  # which links the towers
    elif lost or engine.calls.relink:
        engine.link()
    return lost.names
