"""GetKernels' side of the service: Figure 3 (towers/figures.py) of a named model (models.py)."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.service.models import NamedModel
from towers.figures import colour_specialisation, figure3, png_bytes


@dataclass(frozen=True)
class KernelsFigure:
    png: bytes
    width: int
    height: int
    kernels_per_tower: tuple[int, ...]
    colour_specialisation: tuple[float, ...]
    model_version: int  # 0 for a job's checkpoint
    source: str  # what was drawn, in words


def drawn(model: NamedModel) -> KernelsFigure:
    per_tower = model.conv1_per_tower()
    picture = figure3(per_tower)
    colours = tuple(colour_specialisation(weight) for weight in per_tower)
    return KernelsFigure(
        png_bytes(picture),
        picture.shape[1],
        picture.shape[0],
        tuple(len(w) for w in per_tower),
        colours,
        model.version,
        model.source,
    )
