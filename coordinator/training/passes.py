"""The passes over the data that the training loop makes: training passes, validation passes and
their evaluation, and the log of unreadable files."""

from __future__ import annotations

import logging
from contextlib import closing

import torch

from coordinator.data import Batch, Dataset, DatasetError, batches
from coordinator.training.recipe import Recipe

log = logging.getLogger("coordinator.training.loop")  # the loop's log, where these lines always were


class SkipLog:
    """Unreadable files: each is reported once and counted."""

    def __init__(self):
        self.paths: set[str] = set()

    def add(self, paths) -> None:
        for path in paths:
            if path not in self.paths:
                self.paths.add(path)
                log.warning("skipping unreadable image %s", path)

    def __len__(self) -> int:
        return len(self.paths)


def validation_pass(dataset: Dataset, recipe: Recipe, batch_size: int = 64):
    """Batches of the validation set: centre crops, or with ten_crop the paper's ten views of each image."""
    mode = "ten-crop" if recipe.ten_crop else "eval"
    return batches(
        dataset.val, dataset.stats, batch_size, mode, limit=recipe.val_images or None, normalise=recipe.normalise
    )


def training_pass(dataset: Dataset, recipe: Recipe, epoch: int, steps: int, from_batch: int = 0):
    """The batches of one epoch's `steps` steps, shuffled and augmented for that epoch, from its `from_batch`th."""
    return batches(
        dataset.train,
        dataset.stats,
        recipe.batch_size,
        "train",
        recipe.seed,
        epoch,
        steps * recipe.batch_size,
        recipe.normalise,
        start=from_batch * recipe.batch_size,
    )


def class_probabilities(engine, batch: Batch) -> torch.Tensor:
    """Each image's softmax; for a ten-crop batch, the mean over its ten views."""
    probs = engine.predict(batch.crops).softmax(1)
    return probs.reshape(-1, batch.views, probs.shape[1]).mean(1) if batch.views > 1 else probs


def evaluate(engine, loader, skips: SkipLog) -> tuple[float, float]:
    """Top-1 and top-5 accuracy over a validation pass."""
    correct1 = correct5 = total = 0
    with closing(loader):
        for batch in loader:
            skips.add(batch.bad_paths)
            if len(batch.labels) == 0:
                continue
            probs = class_probabilities(engine, batch)
            top = probs.topk(min(5, probs.shape[1]), dim=1).indices
            hits = top == batch.labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            total += len(batch.labels)
    if total == 0:
        raise DatasetError("no validation image could be read")
    return correct1 / total, correct5 / total
