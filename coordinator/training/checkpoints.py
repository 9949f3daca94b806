"""Checkpoints: a run's snapshot (recovery.py) with its recipe and dataset's identity, written
atomically, and read back to resume the run exactly where it was.

Each checkpoint is written to a temporary file and renamed into place, and latest.pt is a
symlink swapped the same way, so a process killed mid-write leaves every earlier checkpoint
whole and latest.pt pointing at one of them (the temporary file is removed by the next write).
Old checkpoints are pruned: the last `keep` are kept, and the one with the best validation
accuracy. index.json (written atomically too) records each one's step and accuracy.

A checkpoint is read with torch.load(weights_only=True): tensors and plain values only, so a
crafted file cannot run code. Resuming checks that the dataset and the network are the ones the
run had (`check_resumable`), and keeps the run's recipe while letting any run option change
(`resume_spec`). A checkpoint written before the run options had a section of their own holds
them in its recipe: they are read from there.
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
from coordinator.training.recipe import RECIPE_FIELDS, RUN_OPTIONS, Recipe, RunOptions, RunSpec, run_spec, shown
from coordinator.training.recovery import Snapshot

INDEX = "index.json"
LATEST = "latest.pt"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


class CheckpointMissing(CheckpointError):
    """No checkpoint where one was named."""


class ResumeMismatch(ValueError):
    """A checkpoint taken on another dataset or network than the one it would resume on."""


def save_checkpoint(
    folder, snapshot: Snapshot, dataset: Dataset, spec: RunSpec, keep: Optional[int] = None, meta: Optional[dict] = None
) -> Path:
    """Write checkpoint-step<N>.pt atomically (never over an existing one), point latest.pt at it,
    and prune to the last `keep` (default: the run option keep_checkpoints) plus the most accurate.
    `meta`: plain values the caller wants back on resume (the service keeps its request there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):  # left by a process killed while writing
        stale.unlink()
    step, top1 = snapshot.step, snapshot.top1
    path = folder / f"checkpoint-step{step:07d}.pt"
    payload = {
        "format": FORMAT,
        "state_dict": snapshot.weights,
        "optimizer": snapshot.momentum,
        "step": step,
        "epochs_done": snapshot.epoch,
        "position": snapshot.position,
        "engine_steps": snapshot.engine_steps,
        "lr": snapshot.lr,
        "schedule": snapshot.schedule,
        "top1": top1,
        "top5": snapshot.top5,
        "recipe": dataclasses.asdict(spec.recipe),
        "options": dataclasses.asdict(spec.options),
        "classes": list(dataset.classes),
        "labels": list(dataset.labels),
        "stats": dataclasses.asdict(dataset.stats),
        "fingerprint": dataset.fingerprint(),
        "meta": dict(meta or {}),
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
    tmp_link = folder / ".latest.tmp"
    if tmp_link.exists() or tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(path.name)
    os.replace(tmp_link, folder / LATEST)
    index = read_index(folder)
    index[path.name] = {"step": step, "top1": None if math.isnan(top1) else top1}
    write_atomically(folder / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    prune(folder, spec.options.keep_checkpoints if keep is None else keep)
    return path


def find_checkpoint(source) -> Path:
    """The checkpoint file `source` names: a file, or a folder meaning its latest."""
    path = Path(source)
    if path.is_dir():
        latest = path / LATEST
        if latest.is_file():
            return latest.resolve()
        index = read_index(path)
        if not index:
            raise CheckpointMissing(f"{shown(source)} holds no checkpoint (no {LATEST} nor {INDEX})")
        return path / max(index, key=lambda name: index[name]["step"])
    if not path.is_file():
        raise CheckpointMissing(f"no checkpoint file or folder at {shown(source)}")
    return path


def load_checkpoint(source) -> dict:
    """A checkpoint's payload (see save_checkpoint), from a file or a folder's latest."""
    path = find_checkpoint(source)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or objects beyond tensors and plain values
        raise CheckpointError(f"{shown(path)} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{shown(path)} is not a resumable checkpoint (format {FORMAT}; older ones hold too little)"
        )
    payload["path"] = str(path)
    return payload


def snapshot_of(payload: dict) -> Snapshot:
    """The run's snapshot inside a checkpoint's payload."""
    return Snapshot(
        payload["step"],
        payload["epochs_done"],
        payload["position"],
        payload["engine_steps"],
        payload["state_dict"],
        payload["optimizer"],
        payload["lr"],
        payload["schedule"],
        payload["top1"],
        payload["top5"],
    )


def saved_spec(payload: dict) -> RunSpec:
    """The recipe and run options a checkpoint was written with. An older checkpoint keeps its run
    options inside its recipe; a field no longer known is left out, one added since takes its default."""
    stored = {**payload["recipe"], **payload.get("options", {})}
    stored = {name: tuple(v) if isinstance(v, list) else v for name, v in stored.items()}
    recipe = {name: v for name, v in stored.items() if name in RECIPE_FIELDS}
    options = {name: v for name, v in stored.items() if name in RUN_OPTIONS}
    return RunSpec(Recipe(**recipe), RunOptions(**options))


def resume_spec(payload: dict, overrides: Optional[dict] = None) -> RunSpec:
    """The checkpoint's recipe and run options, with run options changed by `overrides`. A recipe
    field may be named only with the value the run has; another width is a ResumeMismatch (the
    network's shape), another value of any other recipe field a ValueError."""
    saved = saved_spec(payload)
    asked = run_spec(overrides={k: v for k, v in (overrides or {}).items() if k in RECIPE_FIELDS}, base=saved).recipe
    if asked.width != saved.recipe.width:
        raise ResumeMismatch(
            f"the network's shape differs: the checkpoint has width {saved.recipe.width}, "
            f"the request asks for {shown(overrides['width'], 40)}"
        )
    changed = [f.name for f in dataclasses.fields(asked) if getattr(asked, f.name) != getattr(saved.recipe, f.name)]
    if changed:
        raise ValueError(
            f"a resumed run keeps its recipe: {', '.join(changed[:5])} cannot change (the run options can: "
            f"{', '.join(RUN_OPTIONS)}); start a new run to change them"
        )
    return run_spec(overrides=overrides, base=saved)


def check_resumable(payload: dict, dataset: Dataset) -> None:
    """ResumeMismatch saying what differs, unless the checkpoint was taken on this dataset's classes and files."""
    problems = []
    if list(payload["classes"]) != list(dataset.classes):
        theirs, ours = len(payload["classes"]), dataset.num_classes
        missing = sorted(set(payload["classes"]) - set(dataset.classes))[:3]
        problems.append(
            f"the classes differ ({theirs} in the checkpoint, {ours} here"
            + (f"; missing here: {', '.join(shown(m, 40) for m in missing)}" if missing else "")
            + ")"
        )
    elif payload["fingerprint"] != dataset.fingerprint():
        problems.append(
            "the same classes but other files (the file list's fingerprint differs): "
            "a resumed run must see the data it was trained on"
        )
    if problems:
        raise ResumeMismatch(
            f"cannot resume {shown(payload.get('path', 'the checkpoint'))} on {shown(dataset.root)}: "
            + "; ".join(problems)
        )


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
        write_atomically(folder / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return gone


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
