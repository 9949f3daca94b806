"""Training: the recipe (presets, overrides, schedules), the loop, and checkpoints."""

from coordinator.training.checkpoints import (
    CheckpointError,
    ResumeMismatch,
    load_checkpoint,
    resume_recipe,
    save_checkpoint,
)
from coordinator.training.loop import Progress, Result, train
from coordinator.training.recipe import PRESETS, PlateauSchedule, Recipe, StepSchedule, recipe

__all__ = [
    "PRESETS",
    "CheckpointError",
    "PlateauSchedule",
    "Progress",
    "Recipe",
    "Result",
    "ResumeMismatch",
    "StepSchedule",
    "load_checkpoint",
    "recipe",
    "resume_recipe",
    "save_checkpoint",
    "train",
]
