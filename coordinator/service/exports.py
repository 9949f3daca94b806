"""ExportModel's side of the service: a named model (models.py) as a file of a portable format
(towers/portable.py), in chunks, with a cap on the exports that run at once."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

from coordinator.service.errors import ResourceExhausted
from coordinator.service.models import NamedModel
from towers import AlexNet
from towers.portable import to_onnx, to_safetensors, to_torch_export

CHUNK_BYTES = 1 << 20  # gRPC's messages stay far below its 4 MiB default
SUFFIXES = {"onnx": "onnx", "torch-export": "pt2", "safetensors": "safetensors"}


def metadata(model: NamedModel) -> dict:
    """What a deployer needs beside the weights: the classes, the input and its preprocessing."""
    size = model.config.image_size
    return {
        "labels": list(model.labels),
        "input": f"images [batch, 3, {size}, {size}] float32: RGB, resized (shorter side 256), centre-cropped, "
        "minus the mean" + (", divided by the spread" if model.normalise else "") + " (per channel, 0-255 scale)",
        "mean": list(model.stats.mean),
        "std": list(model.stats.std) if model.normalise else [1.0, 1.0, 1.0],
        "model_version": model.version,
        "network_variant": model.config.network,  # towers.layers.NETWORKS; safetensors holds it in "network" too
        "source": model.source,
        "precision": "float32",
    }


def file_bytes(model: NamedModel, kind: str) -> bytes:
    """The whole file of that format: "onnx", "torch-export" or "safetensors"."""
    meta = metadata(model)
    if kind == "safetensors":
        return to_safetensors(model.weights(None), model.config, meta)
    net = AlexNet(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)})
    net.load_state_dict(model.weights(None))
    net.eval()
    return to_onnx(net, meta) if kind == "onnx" else to_torch_export(net)


def file_name(model: NamedModel, kind: str) -> str:
    return f"alexnet-{model.stem}.{SUFFIXES[kind]}"


class Exporter:
    """Makes export files, at most `max_running` at once: each holds a handler thread and copies of the weights."""

    def __init__(self, max_running: int = 2):
        self.max_running, self._slots = max_running, threading.BoundedSemaphore(max_running)

    def acquire(self) -> None:
        """Take a slot (release() gives it back), or ResourceExhausted when all are taken."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{self.max_running} exports are running, the most this server allows "
                "(serve --max-exports): retry when one has finished"
            )

    def release(self) -> None:
        self._slots.release()


def chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start : start + CHUNK_BYTES]
