"""Batches of images for the towers, decoded and augmented in parallel by Ray Data.

Ray Data runs the decoding and augmenting tasks (images.Augment) wherever the cluster has room
and streams the batches to the training loop. A worker sends cropped bytes and a per-image colour
shift, and so does the consumer: the towers make the float pixels themselves (towers.inputs.Crops),
which keeps the object store traffic at a quarter of what float pixels would cost.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import ray.cloudpickle
import torch

from coordinator.data import images
from coordinator.data.images import CROP, Augment, ColourStats
from towers.inputs import Crops, crops_of

# Ray Data's workers get the per-image code by value, so they never import this package (and with
# it torch and the engine: seconds and hundreds of MB per worker, for code they do not run).
ray.cloudpickle.register_pickle_by_value(images)


def to_crops(crops: np.ndarray, shifts: np.ndarray, stats: ColourStats, normalise: bool = False) -> Crops:
    """(N, 227, 227, 3) uint8 and (N, 3) colour shifts -> the Crops the towers take (towers.inputs).

    The paper keeps the 0..255 scale, mean subtracted; with `normalise`, each channel is also
    divided by its spread. Crops.to_tensor() makes the float pixels, wherever it runs.
    """
    return crops_of(crops, shifts, stats.mean, stats.std if normalise else None)


def to_tensor(crops: np.ndarray, shifts: np.ndarray, stats: ColourStats, normalise: bool = False) -> torch.Tensor:
    """(N, 227, 227, 3) uint8 and (N, 3) colour shifts -> (N, 3, 227, 227) float32, channels-last in memory."""
    return to_crops(crops, shifts, stats, normalise).to_tensor()


@dataclass
class Batch:
    crops: Crops  # (N images, or N x 10 views for ten-crop), as they travel to the towers
    labels: torch.Tensor
    bad_paths: list[str]
    views: int = 1  # 10 for ten-crop: each image's ten views are consecutive

    @property
    def images(self) -> torch.Tensor:
        """The float pixels: (N, 3, 227, 227), or (N, 10, 3, 227, 227) for ten-crop."""
        pixels = self.crops.to_tensor()
        return pixels if self.views == 1 else pixels.reshape(-1, self.views, *pixels.shape[1:])


def batches(
    samples: Sequence[tuple[str, int]],
    stats: ColourStats,
    batch_size: int,
    mode: str = "train",
    seed: int = 0,
    epoch: int = 0,
    limit: Optional[int] = None,
    normalise: bool = False,
    start: int = 0,
) -> Iterator[Batch]:
    """Batches of one pass over `samples`, reshuffled per epoch in training, decoded by Ray Data.

    A batch may be a few images short where files were unreadable; their paths come with it.
    `start` skips that many images of the pass (a resumed run's position): the rest come exactly
    as they would have, since each image's crop, flip and lighting are drawn from its position.
    """
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-pipeline INFO lines are noise here
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    if mode not in ("train", "eval", "ten-crop"):
        raise ValueError(f"mode must be train, eval or ten-crop, got {mode!r}")
    order = list(range(len(samples)))
    if mode == "train":
        random.Random(f"{seed}/{epoch}").shuffle(order)
    if limit is not None:
        order = order[:limit]
    rows = [{"path": samples[i][0], "label": samples[i][1], "position": p} for p, i in enumerate(order)][start:]
    if not rows:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # the same seed gives the same batches: reproducible runs
    # Blocks of ~64 images: big enough to amortise a task's start, small enough to stream early.
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 256))).map_batches(
        Augment(stats, mode, seed, epoch), batch_size=32, num_cpus=0.5
    )
    for block in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2, drop_last=False):
        ok = block["ok"]
        bad = [str(p) for p in block["path"][~ok]]
        crops, shift = block["crops"][ok], block["shift"][ok]
        views = 10 if mode == "ten-crop" else 1
        if views > 1:
            crops, shift = crops.reshape(-1, CROP, CROP, 3), np.repeat(shift, views, axis=0)
        labels = torch.as_tensor(block["label"][ok], dtype=torch.long)
        yield Batch(to_crops(crops, shift, stats, normalise), labels, bad, views)


def check_room_for_loading(wait: float = 10.0) -> None:
    """Raise a RuntimeError that says what to do if Ray has no CPU free for data loading (its tasks
    take half a CPU each) once the towers are placed; without it a training run would wait for
    its first batch for ever. Waits a little first: actors that just ended free theirs late."""
    deadline = time.monotonic() + wait
    while (free := ray.available_resources().get("CPU", 0.0)) < 0.5 and time.monotonic() < deadline:
        time.sleep(0.2)
    if free < 0.5:
        raise RuntimeError(
            f"the towers hold every CPU Ray has ({ray.cluster_resources().get('CPU', 0):g}), and "
            "loading images needs half a CPU beside them: train with fewer replicas, or give "
            "Ray more CPUs (ray start --num-cpus, or more nodes)"
        )


class EarlyStart:
    """A pass of batches that starts now, though it is read later.

    Its first batch is fetched on a background thread from the moment it is made, so Ray Data's
    start-up (planning, starting tasks, decoding the first blocks: docs/performance.md, "Data
    pipeline") overlaps what runs before the pass is read, instead of stalling the
    towers. After the first batch, the pass is read on the caller's thread as usual.
    """

    def __init__(self, loader: Iterator[Batch]):
        self._loader = loader
        self._first: futures.Future = futures.Future()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._fetch_first, name="loader-early-start", daemon=True).start()

    def _fetch_first(self) -> None:
        try:
            first = next(self._loader, None)  # None: an empty pass
        except BaseException as exc:  # handed to the reader
            self._first.set_exception(exc)
            return
        with self._lock:
            if self._closed:  # closed while this thread fetched: the pipeline ends here
                self._loader.close()
            else:
                self._first.set_result(first)

    def __iter__(self) -> Iterator[Batch]:
        first = self._first.result()
        self._first = _READ  # the pass does not keep its first batch
        if first is not None:
            yield first
            yield from self._loader

    def close(self) -> None:
        """End the pass's pipeline; at once, or as soon as a first batch still being fetched arrives."""
        with self._lock:
            self._closed = True
            if not self._first.done():
                return  # the fetching thread closes it
        self._loader.close()


_READ: futures.Future = futures.Future()
_READ.set_result(None)
