"""The training loop: the paper's recipe, or a demo that learns in minutes, driving the two towers.

    result = train("path/to/imagenet/train", preset="paper", overrides={"epochs": 10}, on_event=print)

One entry point, `train`, takes a dataset, a preset and overrides, reports Progress events to a
callback, and stops cleanly at a step boundary when its `stop` event is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import ray
import torch

from coordinator.data import Dataset, DatasetError, batches, open_dataset
from towers.config import INITS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run besides the data."""

    epochs: int = 90
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    init: str = "paper"  # "paper", "pytorch" or "kaiming" (see towers/init.py)
    normalise: bool = False  # divide pixels by each channel's spread (the paper keeps 0..255 minus the mean)
    schedule: str = "plateau"  # "plateau": /10 when validation error stalls; "step": /10 at lr_epochs
    lr_epochs: tuple[int, ...] = (25, 51)  # the 2012 code's: 0.01, 0.001 from epoch 25, 0.0001 from 51
    patience: int = 1  # epochs without improvement before a plateau drop
    max_drops: int = 3
    steps_per_epoch: int = 0  # 0: a full pass over the training set
    val_images: int = 0  # 0: the whole validation set
    ten_crop: bool = False  # validate on the paper's ten views, averaging softmax
    val_fraction: float = 0.1  # held out when no validation folder is given
    seed: int = 0
    width: float = 1.0  # 1.0 is the paper's network
    publish_every: int = 50  # steps between published model versions (see on_publish)

    def validate(self) -> "Recipe":
        problems = []
        for name in ("epochs", "batch_size", "patience", "publish_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "val_images", "max_drops"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr == 0:
            problems.append("lr must be positive")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.schedule not in ("plateau", "step"):
            problems.append(f"schedule must be plateau or step, got {self.schedule!r}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.width > 0:
            problems.append(f"width must be positive, got {self.width}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


PRESETS = {
    # Krizhevsky et al. 2012, section 5.
    "paper": Recipe(),
    # The same network, tuned so that learning shows within minutes on a 2-core CPU.
    # Measured on the built-in dataset: He initialisation with a zero fc8 and unit-scale pixels leave
    # the plateau at the start after ~100 steps, where the paper's N(0, 0.01) at lr 0.01 takes
    # epochs; lr 0.006 diverged. The last epoch, at a tenth of the rate, adds ~15 points.
    "demo": Recipe(
        epochs=5,
        batch_size=64,
        lr=0.003,
        init="kaiming",
        normalise=True,
        schedule="step",
        lr_epochs=(4,),
        publish_every=10,
    ),
}


def recipe(preset: str = "demo", overrides: Optional[dict] = None) -> Recipe:
    """A preset with overrides applied and checked; unknown names and bad values raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown override {', '.join(unknown)}: known are {', '.join(fields)}")
    base = PRESETS[preset]
    converted = {}
    for name, value in overrides.items():
        kind = type(getattr(base, name))
        try:
            if kind is tuple:
                items = value.split(",") if isinstance(value, str) else value
                converted[name] = tuple(int(v) for v in items)
            elif kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                converted[name] = value.lower() in ("true", "1", "yes")
            else:
                converted[name] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"override {name}={value!r} is not a valid {kind.__name__}") from None
    return dataclasses.replace(base, **converted).validate()


# --- learning-rate schedules -------------------------------------------------------------------
class PlateauSchedule:
    """Divide the rate by 10 when validation error has not improved for `patience` epochs, at most `max_drops` times."""

    def __init__(self, lr: float, patience: int = 1, max_drops: int = 3, min_improvement: float = 1e-4):
        self.lr, self.patience, self.max_drops, self.min_improvement = lr, patience, max_drops, min_improvement
        self.best, self.stalled, self.drops = math.inf, 0, 0

    def update(self, epoch: int, val_error: float) -> float:
        if val_error < self.best - self.min_improvement:
            self.best, self.stalled = val_error, 0
        else:
            self.stalled += 1
            if self.stalled >= self.patience and self.drops < self.max_drops:
                self.lr, self.stalled, self.drops = self.lr / 10, 0, self.drops + 1
        return self.lr


class StepSchedule:
    """Divide the rate by 10 at each of the given epochs (counted from 0)."""

    def __init__(self, lr: float, epochs: Sequence[int]):
        self.base, self.epochs, self.lr = lr, sorted(epochs), lr

    def update(self, epoch: int, val_error: float) -> float:
        """Called after `epoch` finished: the rate for epoch + 1."""
        self.lr = self.base * 0.1 ** sum(1 for e in self.epochs if e <= epoch + 1)
        return self.lr


# --- events and results ------------------------------------------------------------------------
@dataclass
class Progress:
    """One report from the loop. kind: "step" after each step, "epoch" after each validation."""

    kind: str
    step: int
    epoch: int  # epochs completed
    loss: float = math.nan
    top1: float = math.nan  # validation accuracy (fraction), on "epoch" events
    top5: float = math.nan
    images_per_second: float = math.nan
    lr: float = math.nan
    skipped: int = 0  # unreadable images met so far
    steps_per_epoch: int = 0
    epochs: int = 0
    elapsed: float = 0.0
    batch: int = 0  # images in this step
    step_seconds: float = math.nan

    @property
    def top1_error(self) -> float:
        return 1.0 - self.top1

    @property
    def top5_error(self) -> float:
        return 1.0 - self.top5


@dataclass
class Result:
    state: str  # "finished" or "stopped"
    steps: int
    epochs_done: int
    top1: float
    top5: float
    loss: float
    skipped: int
    seconds: float
    history: list[Progress] = field(default_factory=list)


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


def evaluate(engine, dataset: Dataset, recipe: Recipe, skips: SkipLog, batch_size: int = 64) -> tuple[float, float]:
    """Top-1 and top-5 accuracy on the validation set (centre crop, or ten crops averaging softmax)."""
    mode = "ten-crop" if recipe.ten_crop else "eval"
    limit = recipe.val_images or None
    correct1 = correct5 = total = 0
    loader = batches(dataset.val, dataset.stats, batch_size, mode, limit=limit, normalise=recipe.normalise)
    with closing(loader):
        for batch in loader:
            skips.add(batch.bad_paths)
            if len(batch.labels) == 0:
                continue
            if mode == "ten-crop":
                n = batch.images.shape[0]
                probs = engine.predict(batch.images.reshape(n * 10, *batch.images.shape[2:])).softmax(1)
                probs = probs.reshape(n, 10, -1).mean(1)
            else:
                probs = engine.predict(batch.images)
            top = probs.topk(min(5, probs.shape[1]), dim=1).indices
            hits = top == batch.labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            total += len(batch.labels)
    if total == 0:
        raise DatasetError("no validation image could be read")
    return correct1 / total, correct5 / total


def train(
    dataset,
    preset: str = "demo",
    overrides: Optional[dict] = None,
    *,
    on_event: Optional[Callable[[Progress], None]] = None,
    stop: Optional[threading.Event] = None,
    on_publish: Optional[Callable[[int, dict], None]] = None,
    on_stats: Optional[Callable[[dict], None]] = None,
    checkpoint_dir=None,
    engine=None,
) -> Result:
    """Train the two-tower network on `dataset` (a Dataset or a training folder path).

    on_event gets a Progress after every step and every validation; on_publish(step, state_dict)
    gets the weights every `publish_every` steps and at the end; setting `stop` ends the run at
    the next step boundary. on_stats gets each step's tower timings (ModelParallelAlexNet.take_stats).
    With a checkpoint_dir, the weights, optimiser and progress are saved there after every epoch
    and when stopped. An engine may be passed in to reuse its actors.
    """
    from coordinator.engine import ModelParallelAlexNet

    plan = recipe(preset, overrides)
    if not isinstance(dataset, Dataset):
        dataset = open_dataset(dataset, val_fraction=plan.val_fraction)
    stop = stop or threading.Event()
    emit = on_event or (lambda event: None)
    own_engine = engine is None
    if own_engine:
        engine = ModelParallelAlexNet(
            num_classes=dataset.num_classes,
            dropout=plan.dropout,
            lr=plan.lr,
            momentum=plan.momentum,
            weight_decay=plan.weight_decay,
            seed=plan.seed,
            init=plan.init,
            width=plan.width,
        )
    schedule = (
        PlateauSchedule(plan.lr, plan.patience, plan.max_drops)
        if plan.schedule == "plateau"
        else StepSchedule(plan.lr, plan.lr_epochs)
    )
    engine.lr = plan.lr
    per_epoch = math.ceil(len(dataset.train) / plan.batch_size)
    if plan.steps_per_epoch:
        per_epoch = min(per_epoch, plan.steps_per_epoch)
    skips, history = SkipLog(), []
    start, step, epoch, loss, top1, top5, state = time.perf_counter(), 0, 0, math.nan, math.nan, math.nan, "finished"

    def report(kind, done_epochs, **values):
        event = Progress(
            kind, step, done_epochs, lr=engine.lr, skipped=len(skips), steps_per_epoch=per_epoch, epochs=plan.epochs,
            elapsed=time.perf_counter() - start, **values,
        )  # fmt: skip
        history.append(event)
        emit(event)

    last_done, published = 0.0, 0

    def finish_step(pending) -> None:
        """Wait for a submitted step, then report it."""
        nonlocal step, loss, last_done
        ref, images, submitted = pending
        loss, stats = ray.get(ref)
        done = time.perf_counter()
        step_seconds, last_done = done - max(submitted, last_done), done  # its own time, not its wait in line
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step + 1}: lower lr and start again")
        step += 1
        window[1] += images
        if on_stats:
            on_stats(stats)
        rate = window[1] / (time.perf_counter() - window[0])
        report("step", epoch, loss=loss, images_per_second=rate, batch=images, step_seconds=step_seconds)
        if on_publish and step % plan.publish_every == 0:
            publish()

    def publish() -> None:
        nonlocal published
        if step and published != step:
            on_publish(step, engine.state_dict())
            published = step

    pending = None  # one step in flight while the next batch is prepared and uploaded
    try:
        for epoch in range(plan.epochs):
            window = [time.perf_counter(), 0]  # start, images: this epoch's throughput
            limit = per_epoch * plan.batch_size
            loader = batches(
                dataset.train, dataset.stats, plan.batch_size, "train", plan.seed, epoch, limit, plan.normalise
            )
            # closing(): an error or a stop mid-epoch must end Ray Data's pipeline now, not at garbage collection.
            with closing(loader):
                for batch in loader:
                    if stop.is_set():
                        break
                    skips.add(batch.bad_paths)
                    if len(batch.labels) == 0:
                        continue
                    publishing = pending is not None and on_publish and (step + 1) % plan.publish_every == 0
                    if publishing:  # a published version must hold exactly `step`'s weights: no step may run past it
                        finish_step(pending)
                        pending = None
                    submitted = engine.submit_step(batch.images, batch.labels, with_stats=True)
                    if pending is not None:
                        finish_step(pending)
                    pending = (submitted, len(batch.labels), time.perf_counter())
            if pending is not None:
                finish_step(pending)
                pending = None
            if stop.is_set():
                state = "stopped"
                break
            top1, top5 = evaluate(engine, dataset, plan, skips)
            report("epoch", epoch + 1, loss=loss, top1=top1, top5=top5)  # with the rate this epoch used
            engine.lr = schedule.update(epoch, 1 - top1)
            if checkpoint_dir:
                save_checkpoint(checkpoint_dir, engine, dataset, plan, step, epoch + 1)
        else:
            epoch = plan.epochs
        if state == "stopped" and checkpoint_dir and step:
            save_checkpoint(checkpoint_dir, engine, dataset, plan, step, epoch)
        if on_publish:
            publish()
    finally:
        pending = None  # an error's traceback keeps this frame: let go of the step's ObjectRef now
        if own_engine:
            engine.shutdown()
    return Result(state, step, epoch, top1, top5, loss, len(skips), time.perf_counter() - start, history)


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
