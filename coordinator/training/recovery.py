"""Recovery during training: in-memory snapshots, and going back to one when actors die.

A snapshot is taken every `snapshot_every` steps, between two steps (none in flight), and kept in
the driver, outside the actors that may die. When a step fails because a tower or the
coordinator died or hung, the engine replaces them (ModelParallelAlexNet.repair) and the run
goes back to the snapshot: the weights, each tower's momentum, the learning rate and the step
count. The steps since the snapshot are lost (at most `snapshot_every`); the data stream goes on,
so those batches are not seen again in this epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from coordinator.engine import TowerFailure, error_summary


@dataclass
class Snapshot:
    step: int  # the run's steps when it was taken
    engine_steps: int  # the engine's step counter (it seeds dropout)
    weights: dict
    momentum: list  # each tower's optimiser state
    lr: float


def take_snapshot(engine, step: int) -> Snapshot:
    return Snapshot(step, engine.steps, engine.state_dict(), engine.optimizer_state(), engine.lr)


def restore(engine, snapshot: Snapshot) -> None:
    engine.load_state_dict(snapshot.weights)
    engine.load_optimizer_state(snapshot.momentum)
    engine.lr, engine.steps = snapshot.lr, snapshot.engine_steps


def lost_actors(error: BaseException) -> bool:
    """Whether an error can come from a dead or hung actor (then the engine is worth repairing)."""
    return isinstance(error, (TowerFailure, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))



def recover(engine, snapshot: Snapshot, error: BaseException, restarts: int, max_restarts: int) -> list[str]:
    """After `error`: replace the engine's dead or hung actors and restore the snapshot; returns
    what was replaced. Re-raises an error that no lost actor explains, and gives up (RuntimeError)
    after max_restarts recoveries."""
    if not lost_actors(error):
        raise error
    replaced = engine.repair()
    if not replaced:
        raise error
    if restarts >= max_restarts:
        raise RuntimeError(
            f"{', '.join(replaced)} lost after {restarts} recoveries already (max_restarts): {error_summary(error)}"
        ) from error
    restore(engine, snapshot)
    return replaced
