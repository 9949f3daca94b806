"""A run's TensorBoard log: what the network learns, where Prometheus shows the service's health.

    train(dataset, spec, log_dir="runs/first")     # then: tensorboard --logdir runs

Written with torch.utils.tensorboard's SummaryWriter (the tensorboard package's event files):
- scalars, every step: loss, learning rate, images/s, step time, bytes exchanged between towers;
  every validation: top-1 and top-5;
- at the start and after every validation: the paper's Figure 3 (each tower's conv1 kernels,
  towers.figures) and each tower's colour specialisation;
- each layer's weights and biases, per tower, as histograms at a published version at most every
  HISTOGRAM_EVERY steps: the loop reads the weights then anyway, and reading them every step would
  cost more than the step itself.

A run that goes back (a recovery to its last snapshot, or a resume from a checkpoint) marks the
step it goes back to, so TensorBoard drops what was written after it: replayed steps are drawn once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from towers import NetConfig
from towers.figures import figure3

HISTOGRAM_EVERY = 50  # steps, at least, between two sets of weight histograms
HISTOGRAM_BINS = 64
FLUSH_SECONDS = 5  # how stale the files on disk may be while a run trains

# Tags, by what they show.
STEP_SCALARS = (
    "train/loss",
    "train/learning_rate",
    "train/images_per_second",
    "train/step_seconds",
    "train/exchange_bytes",
)
VALIDATION_SCALARS = ("validation/top1", "validation/top5")
KERNELS_IMAGE = "kernels/conv1"


def colour_tag(tower: int) -> str:
    return f"colour_specialisation/tower{tower}"


def histogram_tag(tower: int, parameter: str) -> str:
    return f"tower{tower}/{parameter}"


class TrainingBoard:
    """One run's event files in `log_dir`. `start_step`: the step the run starts from; anything an
    earlier run wrote there after it is dropped (a resume replays those steps)."""

    def __init__(self, log_dir, config: NetConfig, start_step: int = 0, histogram_every: int = HISTOGRAM_EVERY):
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package, only where a run logs

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.config, self.histogram_every = config, histogram_every
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1, flush_secs=FLUSH_SECONDS)
        self.last_histograms = -math.inf

    def step(self, step: int, loss: float, lr: float, images_per_second: float, seconds: float, stats: dict) -> None:
        exchanged = sum(sum(tower["exchange_bytes"].values()) for tower in stats["towers"])
        for tag, value in zip(STEP_SCALARS, (loss, lr, images_per_second, seconds, exchanged)):
            self.writer.add_scalar(tag, value, step)

    def validation(self, step: int, top1: float, top5: float) -> None:
        for tag, value in zip(VALIDATION_SCALARS, (top1, top5)):
            self.writer.add_scalar(tag, value, step)

    def kernels(self, step: int, per_tower: Sequence[torch.Tensor], colours: Sequence[float]) -> None:
        """Figure 3 from each tower's conv1 weight, and each tower's colour specialisation."""
        self.writer.add_image(KERNELS_IMAGE, figure3(per_tower), step, dataformats="HWC")
        for tower, value in enumerate(colours):
            self.writer.add_scalar(colour_tag(tower), value, step)

    def histograms_due(self, step: int) -> bool:
        return step - self.last_histograms >= self.histogram_every

    def weights(self, step: int, state: dict) -> None:
        """Histograms of every layer's weights and biases, per tower, if HISTOGRAM_EVERY steps have passed."""
        if not self.histograms_due(step):
            return
        self.last_histograms = step
        for shape in self.config.shapes:
            for part in ("weight", "bias"):
                name = f"{shape.name}.{part}"
                for tower, values in enumerate(torch.split(state[name], list(shape.out_split))):  # views: no copy
                    self._histogram(histogram_tag(tower, name), values, step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        # torch.histc bins in place; add_histogram's numpy binning copies every weight first
        # (docs/performance.md, "TensorBoard cost")
        values = values.detach().flatten().to(torch.float32)
        low, high = (float(v) for v in torch.aminmax(values))
        if low == high:
            limits, counts = [high], [values.numel()]
        else:
            counts = torch.histc(values, HISTOGRAM_BINS, low, high).tolist()
            limits = torch.linspace(low, high, HISTOGRAM_BINS + 1)[1:].tolist()
        squares = float(torch.dot(values, values))
        self.writer.add_histogram_raw(
            tag, low, high, values.numel(), float(values.sum()), squares, limits, counts, step
        )

    def went_back(self, step: int) -> None:
        """The run went back to `step`: TensorBoard drops what was written after it (as SummaryWriter's purge_step)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer._get_file_writer().add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        if self.last_histograms > step:  # those histograms are dropped: draw the next published weights
            self.last_histograms = -math.inf

    def close(self) -> None:
        self.writer.close()
