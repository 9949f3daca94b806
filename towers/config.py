"""NetConfig: the one dataclass that fixes a network, and the shapes it implies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from towers.layers import NUM_CLASSES, Layer, MaxPool, network_table

INITS = ("paper", "pytorch", "kaiming")


@dataclass(frozen=True)
class NetConfig:
    num_classes: int = 1000
    dropout: float = 0.5
    width: float = 1.0  # scales every hidden layer; 1.0 is the paper's network
    image_size: int = 227
    towers: int = 2
    init: str = "paper"  # "paper": the table's N(0, weight_std^2) and biases; "pytorch": PyTorch's default; "kaiming"
    network: str = "paper"  # a published variant: "paper", "cuda-convnet-2012" or "caffe" (towers.layers.NETWORKS)
    layers: Optional[tuple[Layer, ...]] = None  # None: the network's table; else a table of one's own

    def __post_init__(self):
        table = network_table(self.network)  # an unknown name fails here, naming the known ones
        if self.layers is None:
            object.__setattr__(self, "layers", table)
        if self.num_classes < self.towers:
            raise ValueError(
                f"num_classes must be at least the number of towers ({self.towers}), got {self.num_classes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.towers < 1:
            raise ValueError(f"towers must be at least 1, got {self.towers}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not self.layers or self.layers[0].sees != "image":
            raise ValueError("the first layer of the table must see the image")
        _ = self.shapes  # resolves every size now, so a bad table or image size fails here

    @cached_property
    def shapes(self) -> tuple["LayerShape", ...]:
        return tuple(_resolve(self))

    @cached_property
    def segments(self) -> tuple[tuple["LayerShape", ...], ...]:
        """Runs of layers between exchanges: a new segment starts at every layer that sees both towers."""
        runs: list[list[LayerShape]] = []
        for shape in self.shapes:
            if not runs or shape.layer.sees == "both":
                runs.append([])
            runs[-1].append(shape)
        return tuple(tuple(run) for run in runs)

    @cached_property
    def stage_names(self) -> tuple[str, ...]:
        """Each segment named by its layers, e.g. "conv1-conv2", "fc6"."""
        return tuple(seg[0].name if len(seg) == 1 else f"{seg[0].name}-{seg[-1].name}" for seg in self.segments)

    def parameter_count(self) -> int:
        return sum(s.parameter_count for s in self.shapes)

    def training_flops_per_image(self) -> int:
        """Floating-point operations of one image's training step: forward, and backward at twice that.

        Counts the layers' multiply-adds (2 flops each); the parameter-free ops are a rounding error.
        """
        return 3 * 2 * sum(s.forward_macs for s in self.shapes)


@dataclass(frozen=True)
class LayerShape:
    """A table row with every size made concrete for a NetConfig."""

    layer: Layer
    index: int
    in_total: int  # input channels (conv) or features (fc) over all towers
    out_total: int
    out_split: tuple[int, ...]  # each tower's share of the outputs
    in_per_tower: int  # what one tower's layer takes in
    groups: int  # the single-process layer's groups: the towers, where each sees only its own
    in_size: int  # spatial size of the input (1 for fc)
    layer_size: int  # spatial size of the layer's own output, before any pooling (1 for fc)
    out_size: int  # spatial size after the layer and its `then` ops (1 for fc)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The single-process weight, as PyTorch stores it (grouped weights hold in_total/groups)."""
        if self.layer.kind == "conv":
            k = self.layer.kernel
            return (self.out_total, self.in_total // self.groups, k, k)
        return (self.out_total, self.in_total)

    @property
    def fan_in(self) -> int:
        k = self.layer.kernel if self.layer.kind == "conv" else 1
        return self.in_total // self.groups * k * k

    @property
    def forward_macs(self) -> int:
        """Multiply-adds of this layer's forward pass for one image."""
        return self.weight_count * self.layer_size * self.layer_size

    @property
    def weight_count(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def parameter_count(self) -> int:
        return self.weight_count + self.out_total


def split_sizes(total: int, parts: int) -> tuple[int, ...]:
    """Split `total` units over `parts` towers, the first towers taking one more when uneven."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _resolve(cfg: NetConfig):
    channels, size, prev = 3, cfg.image_size, None
    last = len(cfg.layers) - 1
    for i, layer in enumerate(cfg.layers):
        if layer.out == NUM_CLASSES:
            if i != last:
                raise ValueError(f"only the last layer may take num_classes outputs, not {layer.name}")
            out = cfg.num_classes
        else:
            # Hidden sizes scale with width, kept a multiple of the tower count so every tower gets an equal share.
            out = max(cfg.towers, round(layer.out * cfg.width / cfg.towers) * cfg.towers)
        if layer.sees == "image" and i != 0:
            raise ValueError(f"{layer.name}: only the first layer can see the image")
        if layer.sees == "own" and prev is not None and prev.out_total % cfg.towers:
            raise ValueError(f"{layer.name}: sees only its own tower, so {prev.name} must split evenly")
        if layer.kind == "fc" and size != 1:
            channels, size = channels * size * size, 1  # flatten; tower-major order is preserved
        groups = cfg.towers if layer.sees == "own" else 1
        in_per_tower = channels // cfg.towers if layer.sees == "own" else channels
        in_size = size
        if layer.kind == "conv":
            size = layer_size = _conv_out(size, layer.kernel, layer.stride, layer.pad)
            for op in layer.then:
                if isinstance(op, MaxPool):
                    size = _conv_out(size, op.kernel, op.stride, 0)
        else:
            layer_size = 1
        if size < 1:
            raise ValueError(f"image_size {cfg.image_size} is too small: the output of {layer.name} would be empty")
        prev = LayerShape(
            layer=layer,
            index=i,
            in_total=channels,
            out_total=out,
            out_split=split_sizes(out, cfg.towers),
            in_per_tower=in_per_tower,
            groups=groups,
            in_size=in_size,
            layer_size=layer_size,
            out_size=size,
        )
        yield prev
        channels = out


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (a base seed, a layer name, a tower, a step...)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
