"""A dataset, as the paper and the 2012 code used ImageNet: files, labels, a held-out split, colour statistics.

Every image is rescaled so its shorter side is 256, centre-cropped to 256x256 and kept as RGB
bytes. Training then takes a random 227x227 crop, flips it horizontally half the time, and adds
PCA lighting noise (the eigenvectors of the training set's RGB covariance, scaled by their
eigenvalues times alpha ~ N(0, 0.1), one alpha per component per image); evaluation takes the
centre crop, or the paper's ten crops. The per-channel mean is subtracted last, so pixels stay on
the paper's 0..255 scale. (Per image: images.py; in batches: loader.py.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from coordinator.data.folders import DatasetError, hash_fraction, looks_like_imagenet, read_class_names, scan_folder
from coordinator.data.images import ColourStats
from coordinator.data.loader import batches


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

    def fingerprint(self) -> str:
        """A digest of the classes and of both splits' files (relative to the root) with their labels:
        the dataset's identity, checked when a run resumes. Moving the folder keeps it."""
        digest = hashlib.sha256("\n".join(self.classes).encode())
        for split in (self.train, self.val):
            digest.update(b"\0split")
            for path, label in split:
                relative = os.path.relpath(path, self.root) if os.path.isabs(path) else path
                digest.update(f"\n{relative}\t{label}".encode())
        return digest.hexdigest()[:16]


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
        held_out = [hash_fraction(path) < val_fraction for path, _ in samples]
        train = [s for s, out in zip(samples, held_out) if not out]
        val = [s for s, out in zip(samples, held_out) if out]
        if not val or not train:
            raise DatasetError(
                f"{train_dir} has too few images ({len(samples)}) to hold out {val_fraction:.0%} for validation"
            )
    if stats not in ("auto", "imagenet", "compute"):
        raise DatasetError(f"stats must be auto, imagenet or compute, got {stats!r}")
    dataset = Dataset(train_dir, classes, read_class_names(class_names, classes), train, val)
    if stats == "compute" or (stats == "auto" and not looks_like_imagenet(classes)):
        dataset.stats = compute_colour_stats(train, stats_images)
    return dataset


def compute_colour_stats(samples: Sequence[tuple[str, int]], max_images: int = 500) -> ColourStats:
    """Mean and RGB covariance of (a deterministic sample of) the training images' centre crops."""
    chosen = sorted(samples, key=lambda s: hash_fraction(s[0]))[:max_images]
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    neutral = ColourStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), identity)
    pixels = []
    for batch in batches(chosen, neutral, batch_size=64, mode="eval"):
        # Every 7th pixel is plenty for a 3x3 covariance and keeps this fast.
        pixels.append(batch.images.permute(0, 2, 3, 1).reshape(-1, 3)[::7].numpy())
    if not pixels:
        raise DatasetError("none of the sampled training images could be read")
    return ColourStats.from_pixels(np.concatenate(pixels))
