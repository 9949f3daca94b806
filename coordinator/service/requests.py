"""A StartTraining request, as given and once checked: the recipe and run options, the paths, and what it resumes.

Everything that can be checked before a job is accepted is checked here, so that a refused
request leaves nothing behind and an accepted one does not fail for a reason visible up front.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from coordinator.data import check_folder, patterns
from coordinator.service.errors import InvalidRequest, NotFound, PermissionDenied, PreconditionFailed
from coordinator.training import CheckpointError, ResumeMismatch, RunSpec, load_checkpoint, resume_spec, run_spec
from coordinator.training.checkpoints import CheckpointMissing
from coordinator.training.recipe import shown
from towers import NetConfig
from towers.portable import PortableError, ShapeMismatch, fitted, from_safetensors, is_safetensors

DATASET_FIELDS = ("builtin", "data_dir", "val_dir", "class_names_file")


@dataclass(frozen=True)
class Roots:
    """The folders a request's paths must lie in, after symlinks and '..' are resolved."""

    data: tuple[Path, ...]  # data_dir, val_dir, class_names_file
    checkpoints: tuple[Path, ...]  # checkpoint_dir, resume_from

    @classmethod
    def of(cls, data=(), checkpoints=()) -> "Roots":
        return cls(
            tuple(Path(os.path.realpath(p)) for p in data), tuple(Path(os.path.realpath(p)) for p in checkpoints)
        )

    def check(self, field_name: str, path: str, kind: str = "data") -> Path:
        """The path, resolved; PermissionDenied unless it lies in one of the roots of its kind."""
        roots = self.data if kind == "data" else self.checkpoints
        if "\0" in path:
            raise InvalidRequest(f"{field_name} holds a NUL byte")
        resolved = Path(os.path.realpath(path))
        if not any(resolved.is_relative_to(root) for root in roots):
            option = "--data-root" if kind == "data" else "--checkpoint-root"
            where = ", ".join(str(r) for r in roots) if roots else "none are configured"
            raise PermissionDenied(
                f"{field_name} {shown(path)} is outside the server's {kind} roots ({where}): use a "
                f"folder under them, or ask the operator to add one with `serve {option}`"
            )
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
    log_dir: str = ""  # the job's TensorBoard folder; "": one of its own under the server's log root
    init_from: str = ""  # weights to start from: a checkpoint or safetensors file, a job id, or "version:N"


@dataclass(frozen=True)
class InitialWeights:
    """Weights a new run starts from (fine-tuning), already checked against its network."""

    state: dict  # canonical weights, fc8's left out when `renew_fc8`
    renew_fc8: bool  # the file had another class count: fc8 starts afresh
    source: str  # in words, for the job's events

    def note(self, classes: int) -> str:
        renewed = f"; fc8 starts afresh for {classes} classes" if self.renew_fc8 else ""
        return f"initialised from {self.source}{renewed}"


@dataclass(frozen=True)
class JobPlan:
    """A request once checked: the parsed recipe and run options, and the paths to use."""

    spec: RunSpec
    train_dir: Optional[Path]  # None: the built-in dataset
    val_dir: Optional[Path]
    class_names: Optional[Path]
    checkpoint_dir: Optional[Path]
    log_dir: Optional[Path]  # None: the server picks one under its log root
    request: TrainingRequest  # as it will run: a resumed one's dataset and checkpoint folder filled in
    resume: Optional[dict] = None  # the checkpoint's payload (training.load_checkpoint)
    init: Optional[InitialWeights] = None  # what init_from names, fitted to this network


def check_request(
    request: TrainingRequest, resume_source: Optional[Path] = None, roots: Roots = OPEN, init_source=None
) -> JobPlan:
    """The request's plan, or InvalidRequest (NotFound, PreconditionFailed, PermissionDenied) saying
    what to fix. `resume_source`: the checkpoint file or folder that request.resume_from names;
    `init_source`: what init_from names when it is no path (a job's checkpoint file, or a model
    version's (state, description)). Every path is checked against `roots` before anything reads it."""
    if request.init_from and request.resume_from:
        raise InvalidRequest("init_from starts a new run from a model's weights, resume_from continues a run: give one")
    try:
        return _checked(request, resume_source, roots, init_source)
    except OSError as exc:  # a name too long, a folder that vanished mid-scan, a permission: the request's
        raise InvalidRequest(f"{shown(exc.filename or 'a path')}: {exc.strerror or type(exc).__name__}") from None


def _checked(request: TrainingRequest, resume_source: Optional[Path], roots: Roots, init_source) -> JobPlan:
    payload = None
    if request.resume_from:
        source = roots.check("resume_from", str(resume_source or request.resume_from), "checkpoints")
        payload, request = _resumed(request, source)
    # Each path resolved once and used so from here on: a symlink swapped after the check changes nothing.
    kinds = {
        "data_dir": "data",
        "val_dir": "data",
        "class_names_file": "data",
        "checkpoint_dir": "checkpoints",
        "log_dir": "checkpoints",
    }  # what a job writes goes where checkpoints may
    paths = {
        name: roots.check(name, getattr(request, name), kind) if getattr(request, name) else None
        for name, kind in kinds.items()
    }  # a resumed run's come from its checkpoint: checked too
    if not request.builtin and not request.data_dir:
        raise InvalidRequest(
            "no dataset: set data_dir to an ImageFolder training folder, or builtin for the built-in one"
        )
    train_dir = None if request.builtin else paths["data_dir"]
    val_dir = paths["val_dir"]
    try:
        classes = check_folder(train_dir) if train_dir is not None else None
        if payload is not None and classes is not None and classes != list(payload["classes"]):
            raise ResumeMismatch(
                f"cannot resume on {shown(train_dir)}: its {len(classes)} class folders are not the "
                f"checkpoint's {len(payload['classes'])} classes"
            )
        if val_dir is not None:
            extra = sorted(set(check_folder(val_dir)) - set(classes or []))
            if classes is not None and extra:
                raise InvalidRequest(
                    f"val_dir has classes the training folder lacks: {', '.join(shown(c, 40) for c in extra[:5])}"
                )
        spec = (
            resume_spec(payload, request.overrides)
            if payload
            else run_spec(request.preset or "demo", request.overrides)
        )
    except ResumeMismatch as exc:
        raise PreconditionFailed(str(exc)) from None
    except ValueError as exc:  # DatasetError is one
        raise InvalidRequest(str(exc)) from None
    class_names, checkpoint_dir = paths["class_names_file"], paths["checkpoint_dir"]
    if class_names is not None and not class_names.is_file():
        raise InvalidRequest(f"class_names_file {shown(request.class_names_file)} does not exist")
    for name in ("checkpoint_dir", "log_dir"):
        if paths[name] is not None:
            _check_writable(name, paths[name])
    init = None
    if request.init_from:
        init = initial_weights(request.init_from, init_source, roots, len(classes or patterns.KINDS), spec.recipe.width)
    return JobPlan(spec, train_dir, val_dir, class_names, checkpoint_dir, paths["log_dir"], request, payload, init)


def initial_weights(init_from: str, source, roots: Roots, classes: int, width: float) -> InitialWeights:
    """What init_from names, fitted to a network of `classes` and `width`."""
    if isinstance(source, tuple):  # a model version's weights
        state, described = source
    else:
        path = roots.check("init_from", str(source or init_from), "checkpoints")
        state, described = read_weights(path), shown(str(path))
    try:
        fitted_state, renew = fitted(state, NetConfig(num_classes=classes, width=width))
    except ShapeMismatch as exc:
        raise PreconditionFailed(f"init_from: {exc}") from None
    return InitialWeights(fitted_state, renew, described)


def read_weights(path: Path) -> dict:
    """The canonical weights in a checkpoint (a file, or a folder's latest) or an alexnet-mp safetensors file."""
    try:
        if path.is_file():
            with open(path, "rb") as file:
                head = file.read(9)
            if is_safetensors(head):
                return from_safetensors(path.read_bytes())[0]
        return load_checkpoint(path)["state_dict"]
    except CheckpointMissing as exc:
        raise NotFound(f"init_from: {exc}") from None
    except (CheckpointError, PortableError) as exc:
        raise InvalidRequest(f"init_from: {exc}") from None
    except ShapeMismatch as exc:
        raise PreconditionFailed(f"init_from: {exc}") from None


def _check_writable(field_name: str, folder: Path) -> None:
    """InvalidRequest unless `folder`, or the nearest folder above it that exists, may be written.
    Nothing is made here: a request refused later must leave nothing behind (JobManager makes it)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if existing == folder and not folder.is_dir() else f"cannot be written ({existing})"
        raise InvalidRequest(f"{field_name} {shown(folder)} {what}")


def make_output_dirs(plan: "JobPlan") -> None:
    """Create the accepted job's checkpoint and log folders."""
    for name in ("checkpoint_dir", "log_dir"):
        folder = getattr(plan, name)
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequest(f"{name} {shown(folder)} cannot be made: {exc.strerror or exc}") from None


def _resumed(request: TrainingRequest, source: Path) -> tuple[dict, TrainingRequest]:
    """The checkpoint to resume, and the request with the run's dataset and checkpoint folder where it gave none."""
    if request.preset:
        raise InvalidRequest(
            "a resumed run keeps its checkpoint's recipe: leave preset empty (overrides may change "
            "any run option: epochs, how the run is kept, where its towers compute)"
        )
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
            raise InvalidRequest(
                "the checkpoint does not say which dataset it was trained on: set data_dir (or builtin)"
            )
    if not request.checkpoint_dir:
        filled["checkpoint_dir"] = str(Path(payload["path"]).parent)  # the run goes on writing where it did
    return payload, dataclasses.replace(request, **filled)
