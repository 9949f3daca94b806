"""Which model a request names: the version served now, a version the state dir keeps, or a job's
latest checkpoint. GetKernels draws one; ExportModel takes one elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.data import ColourStats
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
from coordinator.service.state import StateStore
from coordinator.training import CheckpointError, load_checkpoint
from towers import NetConfig


@dataclass
class NamedModel:
    """A model's weights and what is needed to use them. `weights(layer)`: that layer's canonical
    weight only, or (layer None) the whole canonical state dict, read when asked."""

    weights: Callable[[str | None], dict]
    config: NetConfig
    labels: list[str]
    stats: ColourStats
    normalise: bool
    version: int  # 0 for a job's checkpoint
    source: str  # in words
    stem: str  # for a file's name: "v12", "job-<id>"

    def conv1_per_tower(self) -> list[torch.Tensor]:
        return list(torch.split(self.weights("conv1")["conv1.weight"], list(self.config.shapes[0].out_split)))


def served_or_kept(serving, store: StateStore | None, number: int | None) -> NamedModel:
    """The version served now (number None, or its number), else one the state dir keeps."""
    engine, current = serving()
    if number is not None and number < 0:
        raise InvalidRequest(f"model_version must be 0 or more, got {number}")
    if number is None or number == current.version:
        config = engine.config

        def weights(layer: str | None) -> dict:
            if layer is None:
                return engine.state_dict()
            return {f"{layer}.weight": torch.cat(engine.tower_weights(layer))}

        source, stem = f"model version {current.version}, served now", f"v{current.version}"
        labels, stats, normalise = current.labels, current.stats, current.normalise
        return NamedModel(weights, config, labels, stats, normalise, current.version, source, stem)
    kept = store.load_version(number) if store is not None else None
    if kept is None or kept.state is None:
        where = "nor kept in the state dir" if store is not None else "and this server keeps no state dir"
        raise NotFound(
            f"model version {number} is not served now ({current.version} is) {where}; "
            "GetModelInfo shows the served version"
        )
    config = NetConfig(**kept.net)
    source = f"model version {number}, from the state dir"
    return NamedModel(
        lambda layer: kept.state, config, kept.labels, kept.stats, kept.normalise, number, source, f"v{number}"
    )


def of_checkpoint(job_id: str, checkpoint: str) -> NamedModel:
    """A job's latest checkpoint (its status's `checkpoint` file)."""
    if not checkpoint:
        raise PreconditionFailed(
            f"job {job_id} has written no checkpoint (it had no checkpoint_dir, or has not "
            "reached one yet): ask for a model version instead"
        )
    try:
        payload = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise PreconditionFailed(f"job {job_id}'s checkpoint cannot be read: {exc}") from None
    return from_payload(payload, f"job {job_id}", f"job-{job_id}")


def from_payload(payload: dict, whose: str, stem: str = "checkpoint") -> NamedModel:
    """A loaded checkpoint's model (training.load_checkpoint)."""
    network = payload["recipe"].get("network", "paper")  # checkpoints before the variants are the paper's
    config = NetConfig(num_classes=len(payload["classes"]), width=payload["recipe"]["width"], network=network)
    normalise, stats = bool(payload["recipe"].get("normalise", False)), ColourStats(**payload["stats"])
    source = f"{whose}, checkpoint at step {payload['step']}"
    state = payload["state_dict"]
    return NamedModel(lambda layer: state, config, list(payload["labels"]), stats, normalise, 0, source, stem)
