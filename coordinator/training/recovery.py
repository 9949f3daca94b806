"""Snapshots of a run: what a recovery after lost actors goes back to, and what a checkpoint holds.

A snapshot holds everything that decides the rest of a run besides its recipe and data: the
weights, each tower's momentum, the learning rate and schedule, and the counters that the random
streams are drawn from (the data order, crops, flips and lighting from the epoch and the position
in it; dropout from the engine's step count). So a run that goes back to a snapshot, here or from
a checkpoint (checkpoints.py), does again exactly what it did after it.

A snapshot is taken every `snapshot_every` steps, between two steps (none in flight), and kept in
the driver, outside the actors that may die. When a step fails because a tower or the
coordinator died or hung, the failure policy (coordinator.engine.failures) replaces them and the
run goes back to the snapshot, replaying the batches since it (at most `snapshot_every` steps).
With replica groups, a step that failed before any update, while a group kept all its towers,
needs no snapshot: a snapshot of that group, taken then, puts every group back where the run was,
and only the failed steps are redone (Trainer._restart_from_group).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass


@dataclass
class Snapshot:
    step: int  # the run's steps when it was taken
    epoch: int  # epochs completed
    position: int  # batches of this epoch's training pass read (the pass has steps_per_epoch)
    engine_steps: int  # the engine's step counter (it seeds dropout)
    weights: dict
    momentum: list  # each tower's optimiser state
    lr: float
    schedule: dict  # the learning-rate schedule's state (plateau counters, best error, drops)
    top1: float = math.nan  # of the last validation
    top5: float = math.nan


def take_snapshot(
    engine, step: int, epoch: int, position: int, schedule, top1: float, top5: float, group: int = 0
) -> Snapshot:
    """The engine's state now (no step may be in flight) with the run's counters: a replica
    group's weights and momentum (every group holds the same, but for one that lost towers)."""
    return Snapshot(
        step,
        epoch,
        position,
        engine.steps,
        engine.state_dict(group),
        engine.optimizer_state(group),
        engine.lr,
        copy.deepcopy(vars(schedule)),
        top1,
        top5,
    )


def restore(engine, snapshot: Snapshot) -> None:
    engine.load_state_dict(snapshot.weights)
    engine.load_optimizer_state(snapshot.momentum)
    engine.lr, engine.steps = snapshot.lr, snapshot.engine_steps
