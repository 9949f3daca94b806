"""A StartTraining request, as given and once checked: the recipe, the paths, and what it resumes.

Everything that can be checked before a job is accepted is checked here, so that a refused
request leaves nothing behind and an accepted one does not fail for a reason visible up front.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from coordinator.data import check_folder
from coordinator.service.errors import InvalidRequest, NotFound, PermissionDenied, PreconditionFailed
from coordinator.training import CheckpointError, Recipe, ResumeMismatch, load_checkpoint, recipe, resume_recipe
from coordinator.training.checkpoints import CheckpointMissing, shown

DATASET_FIELDS = ("builtin", "data_dir", "val_dir", "class_names_file")


@dataclass(frozen=True)
class Roots:
    """The folders a request's paths must lie in, after symlinks and '..' are resolved."""

    data: tuple[Path, ...]  # data_dir, val_dir, class_names_file
    checkpoints: tuple[Path, ...]  # checkpoint_dir, resume_from

    @classmethod
    def of(cls, data=(), checkpoints=()) -> "Roots":
        return cls(tuple(Path(os.path.realpath(p)) for p in data), tuple(Path(os.path.realpath(p)) for p in checkpoints))

    def check(self, field_name: str, path: str, kind: str = "data") -> Path:
        """The path, resolved; PermissionDenied unless it lies in one of the roots of its kind."""
        roots = self.data if kind == "data" else self.checkpoints
        if "\0" in path:
            raise InvalidRequest(f"{field_name} holds a NUL byte")
        resolved = Path(os.path.realpath(path))
        if not any(resolved.is_relative_to(root) for root in roots):
            option = "--data-root" if kind == "data" else "--checkpoint-root"
            where = ", ".join(str(r) for r in roots) if roots else "none are configured"
            raise PermissionDenied(f"{field_name} {shown(path)} is outside the server's {kind} roots ({where}): use a "
                                   f"folder under them, or ask the operator to add one with `serve {option}`")  # fmt: skip
        return resolved


OPEN = Roots((Path("/"),), (Path("/"),))  # everything: for callers that do their own checking


@dataclass(frozen=True)
class TrainingRequest:
    """What StartTraining asked for, as given."""

    builtin: bool = False
    data_dir: str = ""
    val_dir: str = ""
    class_names_file: str = ""
    preset: str = ""  # "": the demo preset
    overrides: dict = field(default_factory=dict)
    checkpoint_dir: str = ""
    resume_from: str = ""  # a checkpoint file, a checkpoint folder (its latest), or a job id


@dataclass(frozen=True)
class JobPlan:
    """A request once checked: the parsed recipe and the paths to use."""

    recipe: Recipe
    train_dir: Optional[Path]  # None: the built-in dataset
    val_dir: Optional[Path]
    class_names: Optional[Path]
    checkpoint_dir: Optional[Path]
    request: TrainingRequest  # as it will run: a resumed one's dataset and checkpoint folder filled in
    resume: Optional[dict] = None  # the checkpoint's payload (training.load_checkpoint)


def check_request(request: TrainingRequest, resume_source: Optional[Path] = None, roots: Roots = OPEN) -> JobPlan:
    """The request's plan, or InvalidRequest (NotFound, PreconditionFailed, PermissionDenied) saying
    what to fix. `resume_source`: the checkpoint file or folder that request.resume_from names.
    Every path is checked against `roots` before anything reads it."""
    try:
        return _checked(request, resume_source, roots)
    except OSError as exc:  # a name too long, a folder that vanished mid-scan, a permission: the request's
        raise InvalidRequest(f"{shown(exc.filename or 'a path')}: {exc.strerror or type(exc).__name__}") from None


def _checked(request: TrainingRequest, resume_source: Optional[Path], roots: Roots) -> JobPlan:
    payload = None
    if request.resume_from:
        source = roots.check("resume_from", str(resume_source or request.resume_from), "checkpoints")
        payload, request = _resumed(request, source)
    # Each path resolved once and used so from here on: a symlink swapped after the check changes nothing.
    kinds = {"data_dir": "data", "val_dir": "data", "class_names_file": "data", "checkpoint_dir": "checkpoints"}
    paths = {name: roots.check(name, getattr(request, name), kind) if getattr(request, name) else None
             for name, kind in kinds.items()}  # a resumed run's come from its checkpoint: checked too  # fmt: skip
    if not request.builtin and not request.data_dir:
        raise InvalidRequest("no dataset: set data_dir to an ImageFolder training folder, or builtin for the built-in one")
    train_dir = None if request.builtin else paths["data_dir"]
    val_dir = paths["val_dir"]
    try:
        classes = check_folder(train_dir) if train_dir is not None else None
        if payload is not None and classes is not None and classes != list(payload["classes"]):
            raise ResumeMismatch(f"cannot resume on {shown(train_dir)}: its {len(classes)} class folders are not the "
                                 f"checkpoint's {len(payload['classes'])} classes")  # fmt: skip
        if val_dir is not None:
            extra = sorted(set(check_folder(val_dir)) - set(classes or []))
            if classes is not None and extra:
                raise InvalidRequest(f"val_dir has classes the training folder lacks: {', '.join(shown(c, 40) for c in extra[:5])}")
        plan = resume_recipe(payload, request.overrides) if payload else recipe(request.preset or "demo", request.overrides)
    except ResumeMismatch as exc:
        raise PreconditionFailed(str(exc)) from None
    except ValueError as exc:  # DatasetError is one
        raise InvalidRequest(str(exc)) from None
    class_names, checkpoint_dir = paths["class_names_file"], paths["checkpoint_dir"]
    if class_names is not None and not class_names.is_file():
        raise InvalidRequest(f"class_names_file {shown(request.class_names_file)} does not exist")
    if checkpoint_dir is not None:
        _check_writable(checkpoint_dir)
    return JobPlan(plan, train_dir, val_dir, class_names, checkpoint_dir, request, payload)


def _check_writable(folder: Path) -> None:
    """InvalidRequest unless `folder`, or the nearest folder above it that exists, may be written.
    Nothing is made here: a request refused later must leave nothing behind (JobManager makes it)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if existing == folder and not folder.is_dir() else f"cannot be written ({existing})"
        raise InvalidRequest(f"checkpoint_dir {shown(folder)} {what}")


def make_checkpoint_dir(plan: "JobPlan") -> None:
    """Create the accepted job's checkpoint folder."""
    if plan.checkpoint_dir is not None:
        try:
            plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequest(f"checkpoint_dir {shown(plan.checkpoint_dir)} cannot be made: {exc.strerror or exc}") from None


def _resumed(request: TrainingRequest, source: Path) -> tuple[dict, TrainingRequest]:
    """The checkpoint to resume, and the request with the run's dataset and checkpoint folder where it gave none."""
    if request.preset:
        raise InvalidRequest("a resumed run keeps its checkpoint's recipe: leave preset empty (overrides may change "
                             "epochs and how the run is kept)")  # fmt: skip
    try:
        payload = load_checkpoint(source)
    except CheckpointMissing as exc:
        raise NotFound(f"resume_from: {exc}") from None
    except CheckpointError as exc:
        raise InvalidRequest(f"resume_from: {exc}") from None
    saved = payload.get("meta", {}).get("request", {})
    filled = {}
    if not request.builtin and not request.data_dir:
        filled = {name: saved.get(name, TrainingRequest.__dataclass_fields__[name].default) for name in DATASET_FIELDS}
        if not filled["builtin"] and not filled["data_dir"]:
            raise InvalidRequest("the checkpoint does not say which dataset it was trained on: set data_dir (or builtin)")
    if not request.checkpoint_dir:
        filled["checkpoint_dir"] = str(Path(payload["path"]).parent)  # the run goes on writing where it did
    return payload, dataclasses.replace(request, **filled)
