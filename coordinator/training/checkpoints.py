"""Checkpoints: the weights, each tower's momentum and the run's progress, written atomically."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from coordinator.data import Dataset
from coordinator.training.recipe import Recipe


def save_checkpoint(folder, engine, dataset: Dataset, plan: Recipe, step: int, epochs_done: int) -> Path:
    """Write checkpoint-step<N>.pt atomically (never over an existing one) and point latest.pt at it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-step{step:07d}.pt"
    payload = {
        "state_dict": engine.state_dict(),
        "optimizer": engine.optimizer_state(),
        "step": step,
        "epochs_done": epochs_done,
        "lr": engine.lr,
        "recipe": dataclasses.asdict(plan),
        "classes": dataset.classes,
        "labels": dataset.labels,
        "stats": dataclasses.asdict(dataset.stats),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    latest = folder / "latest.pt"
    tmp_link = folder / ".latest.tmp"
    if tmp_link.exists() or tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(path.name)
    os.replace(tmp_link, latest)
    return path
