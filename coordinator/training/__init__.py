"""Training: the recipe and run options (presets, overrides, schedules), the loop, and checkpoints.

The recipe's names are imported at once (they load neither torch nor Ray: the client reads the
presets); the loop and checkpoints, which load both, on first use.
"""

import importlib

from coordinator.training.recipe import (
    PRESETS,
    PlateauSchedule,
    Recipe,
    RunOptions,
    RunSpec,
    StepSchedule,
    run_spec,
)

_LAZY = {
    "CheckpointError": "checkpoints",
    "ResumeMismatch": "checkpoints",
    "load_checkpoint": "checkpoints",
    "resume_spec": "checkpoints",
    "save_checkpoint": "checkpoints",
    "Progress": "loop",
    "Result": "loop",
    "train": "loop",
}

__all__ = [
    "PRESETS",
    "PlateauSchedule",
    "Recipe",
    "RunOptions",
    "RunSpec",
    "StepSchedule",
    "run_spec",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"coordinator.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'coordinator.training' has no attribute {name!r}")
