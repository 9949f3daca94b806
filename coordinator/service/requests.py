"""A StartTraining request, as given and once checked: the recipe, the paths, and what it resumes.

Everything that can be checked before a job is accepted is checked here, so that a refused
request leaves nothing behind and an accepted one does not fail for a reason visible up front.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from coordinator.data import check_folder
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
from coordinator.training import CheckpointError, Recipe, ResumeMismatch, load_checkpoint, recipe, resume_recipe
from coordinator.training.checkpoints import CheckpointMissing

DATASET_FIELDS = ("builtin", "data_dir", "val_dir", "class_names_file")


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


def check_request(request: TrainingRequest, resume_source: Optional[Path] = None) -> JobPlan:
    """The request's plan, or InvalidRequest (NotFound, PreconditionFailed) saying what to fix.
    `resume_source`: the checkpoint file or folder that request.resume_from names."""
    payload = None
    if request.resume_from:
        payload, request = _resumed(request, resume_source or Path(request.resume_from))
    if not request.builtin and not request.data_dir:
        raise InvalidRequest("no dataset: set data_dir to an ImageFolder training folder, or builtin for the built-in one")
    train_dir = None if request.builtin else Path(request.data_dir)
    val_dir = Path(request.val_dir) if request.val_dir else None
    try:
        for folder in (train_dir, val_dir):
            if folder is not None:
                classes = check_folder(folder)
                if payload is not None and folder == train_dir and classes != list(payload["classes"]):
                    raise ResumeMismatch(f"cannot resume on {folder}: its {len(classes)} class folders are not the "
                                         f"checkpoint's {len(payload['classes'])} classes")  # fmt: skip
        plan = resume_recipe(payload, request.overrides) if payload else recipe(request.preset or "demo", request.overrides)
    except ResumeMismatch as exc:
        raise PreconditionFailed(str(exc)) from None
    except ValueError as exc:  # DatasetError is one
        raise InvalidRequest(str(exc)) from None
    class_names = Path(request.class_names_file) if request.class_names_file else None
    if class_names is not None and not class_names.is_file():
        raise InvalidRequest(f"class_names_file {class_names} does not exist")
    checkpoint_dir = Path(request.checkpoint_dir) if request.checkpoint_dir else None
    if checkpoint_dir is not None:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            probe = checkpoint_dir / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InvalidRequest(f"checkpoint_dir {checkpoint_dir} is not writable: {exc.strerror or exc}") from None
    return JobPlan(plan, train_dir, val_dir, class_names, checkpoint_dir, request, payload)


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
