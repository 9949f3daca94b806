"""The built-in dataset: ten kinds of pattern, written as an ImageFolder of JPEGs, made from a seed.

Nothing is downloaded, and every machine makes the same files. Each class is a structure
(stripes, checks, rings, waves, ...) drawn with two random colours, a random period, phase,
centre and slight rotation, plus pixel noise. No single pixel or colour gives the class away:
the network has to learn local structure, which an AlexNet does within minutes on a CPU.
Every class looks like itself in a mirror, so the paper's horizontal flips keep their labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

KINDS = {
    "hstripes": "horizontal stripes",
    "vstripes": "vertical stripes",
    "checks": "checkerboard",
    "dots": "polka dots",
    "rings": "concentric rings",
    "grid": "square grid",
    "hwaves": "horizontal waves",
    "vwaves": "vertical waves",
    "crosshatch": "diagonal crosshatch",
    "blobs": "blobs",
}
SIZE = 256
FORMAT_VERSION = 1  # bump when the drawing changes, so an old copy is regenerated


def draw(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 picture of `kind`."""
    period = rng.uniform(10, 28)
    phase = rng.uniform(0, 2 * math.pi)
    turn = math.radians(rng.uniform(-12, 12))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(0, size, 2)
    u = math.cos(turn) * (x - cx) - math.sin(turn) * (y - cy)
    v = math.sin(turn) * (x - cx) + math.cos(turn) * (y - cy)
    w = 2 * math.pi / period
    if kind == "hstripes":
        field = np.sin(w * v + phase)
    elif kind == "vstripes":
        field = np.sin(w * u + phase)
    elif kind == "checks":
        field = np.sin(w * u + phase) * np.sin(w * v + phase)
    elif kind == "dots":
        field = np.cos(w * u + phase) + np.cos(w * v + phase) - 1.2
    elif kind == "rings":
        field = np.sin(w * np.hypot(u, v) + phase)
    elif kind == "grid":
        field = np.maximum(np.cos(w * u + phase), np.cos(w * v + phase)) - 0.7
    elif kind == "hwaves":
        field = np.sin(w * v + 2.5 * np.sin(0.5 * w * u) + phase)
    elif kind == "vwaves":
        field = np.sin(w * u + 2.5 * np.sin(0.5 * w * v) + phase)
    elif kind == "crosshatch":
        d = math.sqrt(0.5)
        field = np.maximum(np.cos(w * d * (u + v) + phase), np.cos(w * d * (u - v) + phase)) - 0.7
    elif kind == "blobs":
        coarse = rng.normal(size=(int(size / period) + 2,) * 2)
        coarse = ((coarse - coarse.min()) / (np.ptp(coarse) + 1e-9) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64) - 127.5
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(ink - paper).sum() < 150:  # keep the two colours apart
        paper = rng.uniform(0, 255, 3)
    pixels = paper + (ink - paper) * (field > 0)[..., None] + rng.normal(0, 12, (size, size, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(
    root,
    train_per_class: int = 300,
    val_per_class: int = 60,
    seed: int = 2012,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Write root/train/<kind>/*.jpg, root/val/<kind>/*.jpg and root/train/classes.txt; return root.

    Does nothing if root already holds this exact dataset (same sizes, seed and drawing version).
    """
    root = Path(root)
    manifest = {"version": FORMAT_VERSION, "train": train_per_class, "val": val_per_class, "seed": seed}
    stamp = root / "dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == manifest:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".patterns-", dir=root.parent))
    try:
        total, done = len(KINDS) * (train_per_class + val_per_class), 0
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for label, kind in enumerate(KINDS):
                folder = work / split / kind
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split == "val", label, i])
                    Image.fromarray(draw(kind, rng)).save(folder / f"{kind}_{i:05d}.jpg", quality=90)
                    done += 1
                    if progress and (done % 100 == 0 or done == total):
                        progress(done, total)
        (work / "train" / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in KINDS.items()))
        (work / "dataset.json").write_text(json.dumps(manifest))
        if root.exists():
            shutil.rmtree(root)
        os.replace(work, root)  # a half-written dataset never takes the real name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built-in dataset written to %s", root)
    return root


def default_root() -> Path:
    """Where the built-in dataset lives: $ALEXNET_MP_DATA, else the user's cache."""
    return Path(os.environ.get("ALEXNET_MP_DATA") or cache_dir() / "patterns")


def cache_dir() -> Path:
    """alexnet-mp's folder in the user's cache: $XDG_CACHE_HOME/alexnet-mp, else ~/.cache/alexnet-mp."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "alexnet-mp"
