"""Training: the recipe (presets, overrides, schedules), the loop, and checkpoints."""

from coordinator.training.checkpoints import save_checkpoint
from coordinator.training.loop import Progress, Result, train
from coordinator.training.recipe import PRESETS, PlateauSchedule, Recipe, StepSchedule, recipe

__all__ = ["PRESETS", "PlateauSchedule", "Progress", "Recipe", "Result", "StepSchedule", "recipe", "save_checkpoint", "train"]
