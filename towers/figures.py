"""What conv1 learned, as the paper shows it: its Figure 3, and how colour-specific each tower is.

Figure 3 of Krizhevsky et al. (2012) shows the 96 conv1 kernels, the 48 of GPU 1 above the 48 of
GPU 2: the first largely colour-agnostic, the second largely colour-specific. `figure3` draws the
same grid from each tower's conv1 weights; `colour_specialisation` puts a number on the difference.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

COLUMNS = 16  # kernels per row: the paper's figure has three rows of 16 per GPU
SCALE = 4  # screen pixels per weight: an 11x11 kernel is drawn 44 pixels wide
GAP = 2  # white pixels around each kernel
TOWER_GAP = 12  # between one tower's block and the next


@dataclass(frozen=True)
class Figure3Layout:
    """Where each tower's kernels go: the picture's size, and each kernel's top-left pixel (row, column)."""

    height: int
    width: int
    cell: int  # a kernel's side on screen
    origins: tuple[tuple[tuple[int, int], ...], ...]  # per tower, per kernel


def figure3_layout(
    kernels_per_tower: Sequence[int], kernel_size: int, columns: int = COLUMNS, scale: int = SCALE
) -> Figure3Layout:
    """The grid for towers of that many kernels: each tower a block of rows of `columns`, top to bottom."""
    cell = kernel_size * scale
    across = max(1, min(columns, max(kernels_per_tower)))
    width = GAP + across * (cell + GAP)
    origins, top = [], 0
    for index, count in enumerate(kernels_per_tower):
        if index:
            top += TOWER_GAP
        origins.append(
            tuple((top + GAP + (k // across) * (cell + GAP), GAP + (k % across) * (cell + GAP)) for k in range(count))
        )
        top += GAP + math.ceil(count / across) * (cell + GAP)
    return Figure3Layout(top, width, cell, tuple(origins))


def kernel_pixels(kernel: torch.Tensor) -> np.ndarray:
    """One kernel (3, k, k) as an RGB image (k, k, 3) of uint8, stretched from its own lowest weight
    (black) to its highest (full colour), as the paper shows them; a constant kernel is mid-grey."""
    kernel = kernel.detach().to(torch.float64).cpu()
    low, high = kernel.min(), kernel.max()
    span = high - low
    scaled = (kernel - low) / span if span > 0 else torch.full_like(kernel, 0.5)
    return (scaled.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def figure3(per_tower: Sequence[torch.Tensor], columns: int = COLUMNS, scale: int = SCALE) -> np.ndarray:
    """Each tower's conv1 kernels ([kernels, 3, k, k] each), tower 0's block on top: an RGB image
    (height, width, 3) of uint8 on white."""
    for t, weight in enumerate(per_tower):
        if weight.dim() != 4 or weight.shape[1] != 3:
            raise ValueError(f"tower {t}'s conv1 weight must be [kernels, 3, k, k], got {list(weight.shape)}")
    layout = figure3_layout([len(w) for w in per_tower], per_tower[0].shape[-1], columns, scale)
    picture = np.full((layout.height, layout.width, 3), 255, dtype=np.uint8)
    for weight, origins in zip(per_tower, layout.origins):
        for kernel, (top, left) in zip(weight, origins):
            big = kernel_pixels(kernel).repeat(scale, axis=0).repeat(scale, axis=1)
            picture[top : top + layout.cell, left : left + layout.cell] = big
    return picture


def png_bytes(picture: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(picture, "RGB").save(out, format="PNG")
    return out.getvalue()


def colour_shares(weight: torch.Tensor) -> torch.Tensor:
    """Each kernel's share of its energy (sum of squared weights) off the grey axis, where R = G = B.

    0: the kernel weighs the three channels alike (colour-agnostic); 1: its channels cancel at
    every pixel (purely chromatic). Random weights give 2/3 on average: two of the three colour
    directions are off the grey axis.
    """
    weight = weight.detach().to(torch.float64)
    grey = weight.mean(dim=1, keepdim=True)
    energy = weight.pow(2).flatten(1).sum(1)
    return (weight - grey).pow(2).flatten(1).sum(1) / energy.clamp_min(torch.finfo(torch.float64).tiny)


def colour_specialisation(weight: torch.Tensor) -> float:
    """A tower's conv1 kernels' mean colour share (colour_shares): the paper's GPU 1 would read low, GPU 2 high."""
    return float(colour_shares(weight).mean())
