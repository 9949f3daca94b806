"""The network outside this project: safetensors with the towers' own names, ONNX and torch.export.

    data = to_safetensors(state, config, {"labels": ...})     # tower0.conv1.weight, tower1.conv1.weight, ...
    state, config, meta = from_safetensors(data)              # back into towers.AlexNet or the engine, bit-exact
    onnx_bytes = to_onnx(AlexNet(...), meta)                   # images [N, 3, 227, 227] -> probabilities [N, classes]

The exported programs are the single-process two-tower network (towers.AlexNet) in eval mode,
with a softmax on top: what Classify computes from a preprocessed image.
"""

from __future__ import annotations

import io
import json

import torch
from torch import nn

from towers.config import NetConfig

FORMAT = "alexnet-mp"  # the safetensors files' own metadata says so, with its version
FORMAT_VERSION = "1"
NET_FIELDS = ("num_classes", "width", "image_size", "towers", "network")  # the network: shapes and table


class PortableError(ValueError):
    """A file that is not a model this network can read: truncated, foreign, or another format."""


class ShapeMismatch(ValueError):
    """Weights that do not fit the network; the message names the first that does not."""


def tower_key(tower: int, key: str) -> str:
    """A canonical key's name in one tower: "conv1.weight" of tower 1 is "tower1.conv1.weight"."""
    return f"tower{tower}.{key}"


def to_safetensors(state: dict, config: NetConfig, meta: dict | None = None) -> bytes:
    """The canonical weights cut into each tower's rows, under names that say which tower and layer.
    `meta`: plain values (labels, colour statistics, ...) kept as JSON in the file's metadata."""
    from safetensors.torch import save

    tensors = {}
    for s in config.shapes:
        for part in ("weight", "bias"):
            key = f"{s.name}.{part}"
            for tower, piece in enumerate(torch.split(state[key], list(s.out_split))):
                tensors[tower_key(tower, key)] = piece.detach().contiguous()
    net = {name: getattr(config, name) for name in NET_FIELDS}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "network": json.dumps(net)}
    header.update({name: json.dumps(value) for name, value in (meta or {}).items()})
    return save(tensors, metadata=header)


def from_safetensors(data: bytes) -> tuple[dict, NetConfig, dict]:
    """The canonical weights, the network they fit and the file's other metadata (`fitted` takes
    them to a network of another class count)."""
    tensors, header = _read(data)
    try:
        net = json.loads(header.pop("network"))
        meta = {name: json.loads(value) for name, value in header.items() if name not in ("format", "format_version")}
        net.setdefault("network", "paper")  # files written before the variants hold the paper's
        config = NetConfig(**{name: net[name] for name in NET_FIELDS})
    except (KeyError, TypeError, ValueError) as exc:
        raise PortableError(f"the file's metadata does not describe the network ({exc})") from None
    check_fits(tensors, config)
    state = {
        key: torch.cat([tensors[tower_key(t, key)] for t in range(config.towers)]) for key in canonical_keys(config)
    }
    return state, config, meta


def fitted(state: dict, config: NetConfig) -> tuple[dict, bool]:
    """A canonical state's weights for `config`, to start a run from: all of them, or all but fc8's
    when the state has another class count (the caller initialises fc8; True says so). Any other
    weight that is missing or has another shape is a ShapeMismatch naming the first."""
    fc8 = state.get("fc8.weight")
    renew = fc8 is not None and fc8.shape[0] != config.num_classes
    for s in config.shapes:
        for part in ("weight", "bias"):
            key, needed = f"{s.name}.{part}", tuple(s.weight_shape) if part == "weight" else (s.out_total,)
            if renew and s.name == "fc8":
                continue
            if key not in state:
                raise ShapeMismatch(f"the file has no {key}: it is not this network's ({_described(config)})")
            if tuple(state[key].shape) != needed:
                got = list(state[key].shape)
                raise ShapeMismatch(f"{key} has shape {got}, this network needs {list(needed)} ({_described(config)})")
    return {key: state[key] for key in canonical_keys(config) if not (renew and key.startswith("fc8."))}, renew


def is_safetensors(data: bytes) -> bool:
    """Whether the bytes start as a safetensors file does: a little-endian length, then a JSON header."""
    return len(data) >= 9 and data[8:9] == b"{"


def canonical_keys(config: NetConfig) -> list[str]:
    return [f"{s.name}.{part}" for s in config.shapes for part in ("weight", "bias")]


def check_fits(tensors: dict, config: NetConfig) -> None:
    """ShapeMismatch naming the first tower tensor that is missing or has another shape than `config` needs."""
    for s in config.shapes:
        for part in ("weight", "bias"):
            key = f"{s.name}.{part}"
            for t, rows in enumerate(s.out_split):
                name = tower_key(t, key)
                needed = (rows, *s.weight_shape[1:]) if part == "weight" else (rows,)
                if name not in tensors:
                    raise ShapeMismatch(f"the file has no {name}: it is not this network's ({_described(config)})")
                if tuple(tensors[name].shape) != needed:
                    raise ShapeMismatch(
                        f"{name} has shape {list(tensors[name].shape)}, the network needs "
                        f"{list(needed)} ({_described(config)})"
                    )


def _described(config: NetConfig) -> str:
    return f"{config.num_classes} classes, width {config.width}, {config.towers} towers"


def _read(data: bytes) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        header = _header(data)
        tensors = load(data)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise PortableError(f"not a readable safetensors file: truncated or damaged ({str(exc)[:200]})") from None
    if header.get("format") != FORMAT:
        raise PortableError(
            f"a safetensors file, but not one of alexnet-mp's (its metadata names no {FORMAT!r} format)"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise PortableError(
            f"alexnet-mp safetensors format {str(header.get('format_version'))[:20]}: this version "
            f"reads {FORMAT_VERSION}"
        )
    return tensors, header


def _header(data: bytes) -> dict:
    """The file's __metadata__ (safetensors' header is 8 bytes of length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("its header runs past the end of the file: truncated")
    return dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})


class Classifier(nn.Module):
    """The network's probabilities, as Classify gives them: softmax over the logits, in eval mode."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images), dim=1)


def _batch_dim():
    return {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}


def to_torch_export(net: nn.Module) -> bytes:
    """torch.export's program of the classifier, with a dynamic batch: load it with torch.export.load."""
    model = Classifier(net).eval()
    example = torch.zeros(2, 3, net.config.image_size, net.config.image_size)
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def to_onnx(net: nn.Module, meta: dict) -> bytes:
    """An ONNX model of the classifier: input `images` [batch, 3, size, size] float32, output
    `probabilities` [batch, classes]; `meta` goes into its metadata_props as JSON values."""
    model = Classifier(net).eval()
    example = torch.zeros(2, 3, net.config.image_size, net.config.image_size)
    program = torch.onnx.export(
        model,
        (example,),
        dynamic_shapes=_batch_dim(),
        input_names=["images"],
        output_names=["probabilities"],
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    for name, value in {"format": FORMAT, **meta}.items():
        proto.metadata_props.add(key=name, value=value if isinstance(value, str) else json.dumps(value))
    return proto.SerializeToString()
