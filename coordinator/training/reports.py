"""What the training loop reports: a Progress after every step, validation and recovery, and the Result."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Progress:
    """One report from the loop. kind: "step" after each step, "epoch" after each validation."""

    kind: str  # also "recovered": lost actors were replaced and the run went back to its last snapshot
    step: int
    epoch: int  # epochs completed
    loss: float = math.nan
    top1: float = math.nan  # validation accuracy (fraction), on "epoch" events
    top5: float = math.nan
    images_per_second: float = math.nan
    lr: float = math.nan
    skipped: int = 0  # unreadable images met so far
    steps_per_epoch: int = 0
    epochs: int = 0
    elapsed: float = 0.0
    batch: int = 0  # on "step" events: images in this step
    step_seconds: float = math.nan  # on "step" events: how long this step took
    recovery_seconds: float = math.nan  # on "recovered" events: how long replacing the lost actors took
    restarts: int = 0  # recoveries so far
    replaced: int = 0  # on "recovered" events: the actors replaced
    message: str = ""  # on "recovered" events: what died and where the run resumed
    colour_specialisation: tuple = ()  # on "epoch" events: each tower's, of its conv1 kernels (towers.figures)


@dataclass
class Result:
    state: str  # "finished" or "stopped"
    steps: int
    epochs_done: int
    top1: float
    top5: float
    loss: float
    skipped: int
    seconds: float
    restarts: int = 0  # recoveries from lost actors
