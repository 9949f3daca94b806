"""What a training run is asked to do: its recipe (the mathematics) and its run options (how it is
operated), the presets that name both, and the one parser of `--set NAME=VALUE` overrides.

A resumed run keeps its recipe and may change any run option: the options say where and in
which arithmetic the steps run, how the run is kept and when it stops, never what a step computes.
This module imports neither torch nor Ray: the client's commands read its preset names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence


@dataclass(frozen=True)
class Recipe:
    """The mathematics of a run: what each step computes. A resumed run keeps all of it."""

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
    network: str = "paper"  # the published variant: paper, cuda-convnet-2012 or caffe (towers.layers.NETWORKS)
    freeze: str = ""  # layers whose weights stay as the run starts them (fine-tuning): "conv1-conv5", "fc6,fc7"

    def validate(self) -> "Recipe":
        from towers.config import INITS  # here, not at the top: towers loads torch, and the client reads PRESETS
        from towers.layers import frozen_layers, network_table

        problems = at_least(self, 1, ("batch_size", "patience")) + at_least(
            self, 0, ("steps_per_epoch", "val_images", "max_drops")
        )
        for name in ("lr", "momentum", "weight_decay"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr == 0:
            problems.append("lr must be positive")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for check, value in ((network_table, self.network), (frozen_layers, self.freeze)):
            try:
                check(value)
            except ValueError as exc:
                problems.append(str(exc))
        if self.schedule not in ("plateau", "step"):
            problems.append(f"schedule must be plateau or step, got {self.schedule!r}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0 < self.width <= 4:
            problems.append(f"width must be in (0, 4] (1 is the paper's network), got {self.width}")
        if self.batch_size > 4096:
            problems.append(f"batch_size must be at most 4096 (the paper's is 128), got {self.batch_size}")
        raise_problems(problems)
        return self


@dataclass(frozen=True)
class RunOptions:
    """How a run is operated: how long, how it is kept and recovered, and where and in which
    arithmetic its towers compute; never what a step computes, so a resumed run may change any."""

    epochs: int = 90  # where the run stops: a resumed run may go further
    publish_every: int = 50  # steps between published model versions (see training.train's on_publish)
    snapshot_every: int = 100  # steps between in-memory snapshots that a run recovers from when actors die
    checkpoint_every: int = 0  # steps between checkpoints, besides every epoch and on stop (0: those only)
    keep_checkpoints: int = 3  # the last this many are kept, and the most accurate one
    max_restarts: int = 3  # recoveries a run may make before it fails
    transport: str = "auto"  # the backend of the towers' exchanges: auto, gloo or nccl (engine.links.backend_for)
    replicas: int = 1  # data-parallel groups of the towers, each on batch_size / replicas images (engine.replicas)
    precision: str = "float32"  # the towers' arithmetic: float32, or bfloat16 where the hardware has it

    def validate(self) -> "RunOptions":
        # Here, not at the top: the engine and towers load torch and Ray, and the client reads PRESETS.
        from coordinator.engine.links import RETIRED_TRANSPORTS, TRANSPORT_CHOICES
        from towers.precision import PRECISIONS

        problems = at_least(self, 1, ("epochs", "publish_every", "snapshot_every")) + at_least(
            self, 0, ("checkpoint_every", "keep_checkpoints", "max_restarts")
        )
        if self.epochs > 10000:
            problems.append(f"epochs must be at most 10000, got {self.epochs}")
        if not 1 <= self.replicas <= 64:
            problems.append(f"replicas must be between 1 and 64, got {self.replicas}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.transport not in TRANSPORT_CHOICES + RETIRED_TRANSPORTS:  # a retired one, from an old checkpoint
            problems.append(f"transport must be one of {', '.join(TRANSPORT_CHOICES)}, got {self.transport!r}")
        raise_problems(problems)
        return self


class RunSpec(NamedTuple):
    """What a run is asked to do: the recipe it computes and the options it is operated by."""

    recipe: Recipe
    options: RunOptions

    def validate(self) -> "RunSpec":
        self.recipe.validate()
        self.options.validate()
        if self.recipe.batch_size % self.options.replicas:
            raise ValueError(
                f"batch_size ({self.recipe.batch_size}) must be a multiple of replicas ({self.options.replicas}): "
                "each group takes an equal share"
            )
        return self


PRESETS = {
    # Krizhevsky et al. 2012, section 5.
    "paper": RunSpec(Recipe(), RunOptions()),
    # The same network, tuned so that learning shows within minutes on a 2-core CPU: He
    # initialisation with a zero fc8 and unit-scale pixels leave the plateau at the start where the
    # paper's N(0, 0.01) takes epochs; the last epoch runs at a tenth of the rate (docs/performance.md,
    # "The demo and CI").
    "demo": RunSpec(
        Recipe(batch_size=64, lr=0.003, init="kaiming", normalise=True, schedule="step", lr_epochs=(4,)),
        RunOptions(epochs=5, publish_every=10, snapshot_every=20),
    ),
}
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(RunOptions))


def run_spec(preset: str = "demo", overrides: Optional[dict] = None, base: Optional[RunSpec] = None) -> RunSpec:
    """A preset (or `base`) with overrides applied and checked: each name goes to the recipe or the
    run options, whichever has it. Unknown names and bad values raise ValueError."""
    if base is None and preset not in PRESETS:
        raise ValueError(f"unknown preset {shown(repr(preset), 40)}: choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS) - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown override {', '.join(shown(name, 40) for name in unknown[:5])}: the recipe's are "
            f"{', '.join(RECIPE_FIELDS)}; the run options are {', '.join(RUN_OPTIONS)}"
        )
    base = base or PRESETS[preset]
    recipe = dataclasses.replace(base.recipe, **converted(base.recipe, overrides, RECIPE_FIELDS))
    options = dataclasses.replace(base.options, **converted(base.options, overrides, RUN_OPTIONS))
    return RunSpec(recipe, options).validate()


def converted(base, overrides: dict, names: Sequence[str]) -> dict:
    """The overrides that name one of `names`, each as the type `base` holds there."""
    values = {}
    for name, value in overrides.items():
        if name not in names:
            continue
        kind = type(getattr(base, name))
        try:
            if kind is tuple:
                items = value.split(",") if isinstance(value, str) else value
                values[name] = tuple(int(v) for v in items)
            elif kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                values[name] = value.lower() in ("true", "1", "yes")
            else:
                values[name] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"override {name}={shown(repr(value), 40)} is not a valid {kind.__name__}") from None
    return values


def at_least(fields, minimum: int, names: Sequence[str]) -> list[str]:
    """A problem for each of `names` below `minimum`."""
    words = "at least 1" if minimum == 1 else f"{minimum} or more"
    return [f"{name} must be {words}, got {getattr(fields, name)}" for name in names if getattr(fields, name) < minimum]


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def shown(value, limit: int = 200) -> str:
    """A path or name for a message, cut short: messages never carry unbounded input."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def schedule_for(recipe: Recipe):
    """The recipe's learning-rate schedule, at its starting rate."""
    if recipe.schedule == "plateau":
        return PlateauSchedule(recipe.lr, recipe.patience, recipe.max_drops)
    return StepSchedule(recipe.lr, recipe.lr_epochs)
