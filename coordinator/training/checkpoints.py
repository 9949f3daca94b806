"""Checkpoints: the weights, each tower's momentum and the run's progress, written atomically.

Each checkpoint is written to a temporary file and renamed into place, and latest.pt is a
symlink swapped the same way, so a process killed mid-write leaves every earlier checkpoint
whole and latest.pt pointing at one of them (the temporary file is removed by the next write).
Old checkpoints are pruned: the last `keep` are kept, and the one with the best validation
accuracy. index.json (written atomically too) records each one's step and accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from coordinator.data import Dataset
from coordinator.training.recipe import Recipe

INDEX = "index.json"


def save_checkpoint(folder, engine, dataset: Dataset, plan: Recipe, step: int, epochs_done: int,
                    top1: float = math.nan, keep: Optional[int] = None) -> Path:  # fmt: skip
    """Write checkpoint-step<N>.pt atomically (never over an existing one), point latest.pt at it,
    and prune to the last `keep` (default plan.keep_checkpoints) plus the most accurate."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):  # left by a process killed while writing
        stale.unlink()
    path = folder / f"checkpoint-step{step:07d}.pt"
    payload = {
        "state_dict": engine.state_dict(),
        "optimizer": engine.optimizer_state(),
        "step": step,
        "epochs_done": epochs_done,
        "top1": top1,
        "lr": engine.lr,
        "recipe": dataclasses.asdict(plan),
        "classes": dataset.classes,
        "labels": dataset.labels,
        "stats": dataclasses.asdict(dataset.stats),
    }
    _write_atomically(path, lambda tmp: torch.save(payload, tmp))
    tmp_link = folder / ".latest.tmp"
    if tmp_link.exists() or tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(path.name)
    os.replace(tmp_link, folder / "latest.pt")
    index = read_index(folder)
    index[path.name] = {"step": step, "top1": None if math.isnan(top1) else top1}
    _write_atomically(folder / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    prune(folder, plan.keep_checkpoints if keep is None else keep)
    return path


def read_index(folder) -> dict:
    """Each checkpoint file written here (and not pruned): its step and validation accuracy."""
    try:
        return json.loads((Path(folder) / INDEX).read_text())
    except FileNotFoundError:
        return {}


def prune(folder, keep: int) -> list[str]:
    """Delete all but the last `keep` checkpoints and the most accurate one; what was deleted."""
    folder = Path(folder)
    index = read_index(folder)
    by_step = sorted(index, key=lambda name: index[name]["step"])
    scored = [name for name in by_step if index[name]["top1"] is not None]
    kept = set(by_step[-keep:] if keep > 0 else [])
    if scored:
        kept.add(max(scored, key=lambda name: (index[name]["top1"], index[name]["step"])))
    gone = [name for name in by_step if name not in kept]
    for name in gone:
        (folder / name).unlink(missing_ok=True)
        del index[name]
    if gone:
        _write_atomically(folder / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return gone


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
