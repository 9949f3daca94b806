"""The network's input as the data pipeline makes it: uint8 crops and a colour offset per image.

A batch of crops is a quarter of the bytes of the float pixels it stands for, so it is what
travels to the towers; each tower makes the float pixels on its own device. float32 adds and
divides are correctly rounded on every device, so the towers get the same bits the data
pipeline would have made (to_tensor is the one place that arithmetic is written).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from towers.kernels import crops_to_float


@dataclass(frozen=True)
class Crops:
    pixels: np.ndarray  # (N, H, W, 3) uint8, RGB
    offsets: np.ndarray  # (N, 3) float32: added to every pixel of each image (its colour shift minus the mean)
    divisors: Optional[np.ndarray] = None  # (3,) float32: each channel's spread, where the recipe normalises

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float batch: (N, 3, H, W)."""
        n, h, w, c = self.pixels.shape
        return (n, c, h, w)

    def __getitem__(self, rows: slice) -> "Crops":
        return Crops(self.pixels[rows], self.offsets[rows], self.divisors)

    def check(self) -> None:
        """A ValueError that says what is wrong with a batch that the towers could not take."""
        pixels, offsets = self.pixels, self.offsets
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"crops must be uint8 of shape [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        if offsets.dtype != np.float32 or offsets.shape != (len(pixels), 3) or not np.isfinite(offsets).all():
            raise ValueError(
                f"crop offsets must be {len(pixels)} finite float32 triples, got {offsets.dtype} {list(offsets.shape)}"
            )
        divisors = self.divisors
        if divisors is not None and (
            divisors.dtype != np.float32 or divisors.shape != (3,) or not (divisors > 0).all()
        ):
            raise ValueError("crop divisors must be three positive float32 values")

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N, 3, H, W) float32 pixels, channels-last in memory, on `device`. To a GPU the crops go
        from pinned memory without blocking, and are made float there."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # arrays from Ray's object store are read-only: only read here
            pixels = torch.from_numpy(np.ascontiguousarray(self.pixels))
            offsets = torch.from_numpy(np.ascontiguousarray(self.offsets))
        divisors = None if self.divisors is None else torch.from_numpy(np.ascontiguousarray(self.divisors))
        device = torch.device(device)
        if device.type == "cpu" and (floats := crops_to_float(pixels, offsets, divisors)) is not None:
            return floats.permute(0, 3, 1, 2)  # one pass of the C kernel
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
            offsets = offsets.to(device)
        floats = pixels.float().add_(offsets[:, None, None, :])
        if divisors is not None:
            floats = floats.div_(divisors.to(device))
        return floats.permute(0, 3, 1, 2)


def crops_of(pixels: np.ndarray, shifts: np.ndarray, mean, std=None) -> Crops:
    """Crops from uint8 pixels, each image's colour shift, and the channels' mean (and spread, to normalise)."""
    offsets = (torch.as_tensor(shifts, dtype=torch.float32) - torch.tensor(mean, dtype=torch.float32)).numpy()
    divisors = None if std is None else np.asarray(std, dtype=np.float32)
    return Crops(np.ascontiguousarray(pixels, dtype=np.uint8), offsets, divisors)
