"""A model version: weights with everything needed to use them, and the answers it gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coordinator.data import ColourStats
from coordinator.service.errors import InvalidRequest


@dataclass
class ModelVersion:
    """Weights and everything needed to use them: labels and the input preprocessing."""

    version: int
    state: dict | None  # None: the serving towers' own initial weights
    labels: list[str]
    stats: ColourStats
    normalise: bool
    net: dict  # NetConfig fields

    @property
    def note(self) -> str:
        return "initial weights: not trained yet" if self.version == 0 else f"trained, version {self.version}"


@dataclass
class Prediction:
    class_index: int
    label: str
    probability: float


def check_top_k(top_k: int, classes: int) -> None:
    if not 1 <= top_k <= classes:
        raise InvalidRequest(f"top_k must be between 1 and {classes} (the classes), got {top_k}")


def top_classes(probs: torch.Tensor, version: ModelVersion, top_k: int) -> list[list[Prediction]]:
    """The top_k classes of each row of probabilities, most probable first."""
    values, indices = probs.topk(min(top_k, len(version.labels)), dim=1)
    return [
        [Prediction(int(i), version.labels[int(i)], float(p)) for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(values, indices)
    ]
