"""The input path, as the paper and the 2012 code did it, decoded and augmented in parallel by Ray Data.

Every image is rescaled so its shorter side is 256, centre-cropped to 256x256 and kept as RGB
bytes. Training then takes a random 227x227 crop, flips it horizontally half the time, and adds
PCA lighting noise (the eigenvectors of the training set's RGB covariance, scaled by their
eigenvalues times alpha ~ N(0, 0.1), one alpha per component per image); evaluation takes the
centre crop, or the paper's ten crops. The per-channel mean is subtracted last, so pixels stay on
the paper's 0..255 scale.

Ray Data runs the decoding and augmenting tasks wherever the cluster has room and streams the
batches to the training loop. A worker sends cropped bytes and a per-image colour shift; the
consumer turns them into float32 in one vectorised pass, which keeps the object store traffic at
a quarter of what float pixels would cost.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from coordinator.images import (  # noqa: F401 (re-exported: the input path's whole vocabulary)
    CROP,
    STORED,
    Augment,
    BadImage,
    ColourStats,
    centre_crop,
    lighting_shift,
    load_image,
    random_crop_and_flip,
    ten_crops,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what to fix."""


@dataclass
class Dataset:
    """Training and validation samples (path, class index) of one ImageFolder dataset."""

    root: Path
    classes: list[str]  # folder names, e.g. synset ids
    labels: list[str]  # human-readable names
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    stats: ColourStats = field(default_factory=ColourStats.imagenet)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- finding the files -------------------------------------------------------------------------
def _class_folders(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a folder")
    classes = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected the ImageFolder layout root/<class>/<image>")
    return classes


def _images_in(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _no_images(root: Path) -> DatasetError:
    return DatasetError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in them")


def check_folder(root: Path) -> None:
    """Fail fast, saying what to fix, unless `root` holds class folders with at least one image."""
    for folder in _class_folders(root):
        if next(_images_in(folder), None) is not None:
            return
    raise _no_images(root)


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders (sorted) and (path, class index) for every image file under them."""
    folders = _class_folders(root)
    samples = [(str(path), index) for index, folder in enumerate(folders) for path in _images_in(folder)]
    if not samples:
        raise _no_images(root)
    return [f.name for f in folders], samples


def read_class_names(path: Optional[Path], classes: Sequence[str]) -> list[str]:
    """Human-readable labels from lines like 'n01440764 tench'; folder names where a line is missing."""
    if path is None:
        return list(classes)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class names file {path} does not exist")
    names = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            names[parts[0]] = parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0]
    return [names.get(c, c) for c in classes]


def looks_like_imagenet(classes: Sequence[str]) -> bool:
    return len(classes) == 1000 and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes)


def open_dataset(
    train_dir,
    val_dir=None,
    *,
    val_fraction: float = 0.1,
    class_names=None,
    stats: str = "auto",
    stats_images: int = 500,
) -> Dataset:
    """An ImageFolder dataset with its validation split and colour statistics.

    Without `val_dir`, a deterministic `val_fraction` of each class is held out, chosen by a hash of
    the file's path, so the split never changes when files are added. `stats`: "imagenet", "compute"
    (from `stats_images` training images), or "auto" (ImageNet's for a 1000-synset ImageNet layout).
    """
    train_dir = Path(train_dir)
    classes, samples = scan_folder(train_dir)
    if class_names is None and (train_dir / "classes.txt").is_file():
        class_names = train_dir / "classes.txt"
    if val_dir is not None:
        val_classes, val = scan_folder(Path(val_dir))
        missing = sorted(set(val_classes) - set(classes))
        if missing:
            raise DatasetError(f"validation folder has classes the training folder lacks: {', '.join(missing[:5])}")
        index = {name: i for i, name in enumerate(classes)}
        val = [(path, index[val_classes[label]]) for path, label in val]
        train = samples
    else:
        if not 0 < val_fraction < 1:
            raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        held_out = [_hash_fraction(path) < val_fraction for path, _ in samples]
        train = [s for s, out in zip(samples, held_out) if not out]
        val = [s for s, out in zip(samples, held_out) if out]
        if not val or not train:
            raise DatasetError(f"{train_dir} has too few images ({len(samples)}) to hold out {val_fraction:.0%} for validation")
    if stats not in ("auto", "imagenet", "compute"):
        raise DatasetError(f"stats must be auto, imagenet or compute, got {stats!r}")
    dataset = Dataset(train_dir, classes, read_class_names(class_names, classes), train, val)
    if stats == "compute" or (stats == "auto" and not looks_like_imagenet(classes)):
        dataset.stats = compute_colour_stats(train, stats_images)
    return dataset


def _hash_fraction(path: str) -> float:
    name = Path(path)
    key = f"{name.parent.name}/{name.name}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "little") / 2**64


def to_tensor(crops: np.ndarray, shifts: np.ndarray, stats: ColourStats, normalise: bool = False) -> torch.Tensor:
    """(N, 227, 227, 3) uint8 and (N, 3) colour shifts -> (N, 3, 227, 227) float32, mean subtracted.

    The paper keeps the 0..255 scale; with `normalise`, each channel is also divided by its spread.
    The result is channels-last in memory, the layout the towers compute in and the wire carries.
    """
    offset = torch.as_tensor(shifts, dtype=torch.float32) - torch.tensor(stats.mean, dtype=torch.float32)
    images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    images = images.add_(offset[:, :, None, None])
    if normalise:
        images = images.div_(torch.tensor(stats.std, dtype=torch.float32)[None, :, None, None])
    return images



# --- Ray Data ----------------------------------------------------------------------------------
@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, 227, 227), or (N, 10, 3, 227, 227) for ten-crop
    labels: torch.Tensor
    bad_paths: list[str]


def batches(
    samples: Sequence[tuple[str, int]],
    stats: ColourStats,
    batch_size: int,
    mode: str = "train",
    seed: int = 0,
    epoch: int = 0,
    limit: Optional[int] = None,
    normalise: bool = False,
) -> Iterator[Batch]:
    """Batches of one pass over `samples`, reshuffled per epoch in training, decoded by Ray Data.

    A batch may be a few images short where files were unreadable; their paths come with it.
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
    if not order:
        return
    rows = [{"path": samples[i][0], "label": samples[i][1], "position": p} for p, i in enumerate(order)]
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
        if mode == "ten-crop":
            n = crops.shape[0]
            images = to_tensor(crops.reshape(n * 10, CROP, CROP, 3), np.repeat(shift, 10, axis=0), stats, normalise)
            images = images.reshape(n, 10, 3, CROP, CROP)
        else:
            images = to_tensor(crops, shift, stats, normalise)
        yield Batch(images, torch.as_tensor(block["label"][ok], dtype=torch.long), bad)


def compute_colour_stats(samples: Sequence[tuple[str, int]], max_images: int = 500) -> ColourStats:
    """Mean and RGB covariance of (a deterministic sample of) the training images' centre crops."""
    chosen = sorted(samples, key=lambda s: _hash_fraction(s[0]))[:max_images]
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    neutral = ColourStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), identity)
    pixels = []
    for batch in batches(chosen, neutral, batch_size=64, mode="eval"):
        # Every 7th pixel is plenty for a 3x3 covariance and keeps this fast.
        pixels.append(batch.images.permute(0, 2, 3, 1).reshape(-1, 3)[::7].numpy())
    if not pixels:
        raise DatasetError("none of the sampled training images could be read")
    return ColourStats.from_pixels(np.concatenate(pixels))
