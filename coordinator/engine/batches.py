"""A call's inputs: checked in the driver, then put once into the object store for the towers.

A batch travels as the narrowest form that gives the towers the same bits: the data pipeline's
Crops (uint8 pixels and a colour offset per image, a quarter of the float bytes, made float on
the tower: towers.inputs), or float pixels as (N, H, W, C), a view of channels-last memory.
The checks run in numpy: torch would spread them over its threads, whose spinning afterwards
takes the cores the towers compute on (docs/performance.md, "Training step").
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from towers.inputs import Crops


def check_images(images, dtype: torch.dtype, size: int) -> np.ndarray | Crops:
    """A batch the towers can take: Crops, or float pixels [N, 3, size, size] (as `dtype`, then as they travel)."""
    if isinstance(images, Crops):
        images.check()
        shape = images.shape
    else:
        pixels = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        images = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if pixels.ndim == 4 else pixels, _numpy(dtype))
        shape = (images.shape[0], images.shape[3], *images.shape[1:3]) if images.ndim == 4 else images.shape
    if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        raise ValueError(f"images must have shape [N, 3, {size}, {size}], got {list(shape)}")
    if shape[0] == 0:
        raise ValueError("images is an empty batch")
    # A sum is one fast pass and is NaN or infinite if any pixel is; only then check pixel by pixel.
    if isinstance(images, np.ndarray) and not np.isfinite(images.sum()) and not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    return images


def check_labels(labels, batch: int, classes: int) -> np.ndarray:
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.dtype.kind not in "iu" or labels.shape != (batch,):
        raise ValueError(f"labels must be {batch} integer class indices, got {labels.dtype} {list(labels.shape)}")
    if batch and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be in [0, {classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def put_batch(images: np.ndarray | Crops) -> ray.ObjectRef:
    """A checked batch into the object store, once for every tower that reads it."""
    return ray.put(images)


def _numpy(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))
