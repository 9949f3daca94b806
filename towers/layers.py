"""The whole network as one declarative table, in the spirit of the 2012 code's layers-145.cfg.

Each row is one learned layer. `sees` says where its input comes from:
  "image": the input picture, which every tower holds whole;
  "own":   the previous layer's output on the same tower only (a grouped convolution);
  "both":  the previous layer's output of every tower: a cross-tower exchange happens first.
`then` lists the parameter-free operations that follow the layer, in order. They always act
inside one tower: LRN and pooling never look across the tower boundary.

Channel counts are totals over all towers; each tower holds an equal share (fc8 may split
unevenly when the class count is odd). Changing the layer order, or using Caffe's LRN (k=1),
is a change to this data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Union


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class LRN:
    """Local response normalisation across channels, with PyTorch's LocalResponseNorm semantics:
    b = a / (k + alpha/size * sum of a^2 over `size` neighbouring channels) ** beta.
    Dividing alpha by size is what Krizhevsky's 2012 code does too."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0


@dataclass(frozen=True)
class MaxPool:
    kernel: int = 3
    stride: int = 2


@dataclass(frozen=True)
class Dropout:
    """Drops units with the network's dropout probability (NetConfig.dropout) in training."""


Op = Union[ReLU, LRN, MaxPool, Dropout]
Source = Literal["image", "own", "both"]


@dataclass(frozen=True)
class Layer:
    name: str
    kind: Literal["conv", "fc"]
    out: int  # channels or features, total over the towers; 0 on the last row means num_classes
    sees: Source
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    bias_init: float = 0.0  # the paper's initial bias: 1 where the next ReLU should start active
    then: tuple[Op, ...] = field(default=())


NUM_CLASSES = 0  # placeholder in `out`: filled from NetConfig.num_classes

# fmt: off
ALEXNET_2012: tuple[Layer, ...] = (
    #      name     kind    out   sees     kernel stride pad bias  then
    Layer("conv1", "conv",   96, "image", 11,    4,     0,  0.0, (ReLU(), LRN(), MaxPool())),
    Layer("conv2", "conv",  256, "own",    5,    1,     2,  1.0, (ReLU(), LRN(), MaxPool())),
    Layer("conv3", "conv",  384, "both",   3,    1,     1,  0.0, (ReLU(),)),
    Layer("conv4", "conv",  384, "own",    3,    1,     1,  1.0, (ReLU(),)),
    Layer("conv5", "conv",  256, "own",    3,    1,     1,  1.0, (ReLU(), MaxPool())),
    Layer("fc6",   "fc",   4096, "both",                    bias_init=1.0, then=(ReLU(), Dropout())),
    Layer("fc7",   "fc",   4096, "both",                    bias_init=1.0, then=(ReLU(), Dropout())),
    Layer("fc8",   "fc", NUM_CLASSES, "both"),
)
# fmt: on


def with_lrn(layers: tuple[Layer, ...], lrn: LRN) -> tuple[Layer, ...]:
    """The same table with every LRN replaced, e.g. Caffe's variant: with_lrn(ALEXNET_2012, LRN(k=1))."""
    return tuple(replace(row, then=tuple(lrn if isinstance(op, LRN) else op for op in row.then)) for row in layers)


def frozen_layers(spec: str, layers: tuple[Layer, ...] = ALEXNET_2012) -> tuple[str, ...]:
    """The layers that a freeze `spec` names, in table order: "" for none, a range "conv1-conv5",
    a list "fc6,fc7", or both ("conv1-conv3,fc6"). A name the table lacks, a range that runs
    backwards, or every layer (nothing would train) is a ValueError saying what to write."""
    names = [row.name for row in layers]
    chosen: set[str] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, dash, last = (end.strip() for end in part.partition("-"))
        last = last if dash else first
        unknown = [end for end in (first, last) if end not in names]
        if unknown:
            raise ValueError(f"freeze: no layer {unknown[0][:20]!r} in the table: its layers are {', '.join(names)}")
        start, stop = names.index(first), names.index(last)
        if start > stop:
            raise ValueError(f"freeze: the range {first}-{last} runs backwards: write {last}-{first}")
        chosen.update(names[start : stop + 1])
    if len(chosen) == len(names):
        raise ValueError(f"freeze names every layer, which leaves nothing to train: leave {names[-1]} out at least")
    return tuple(name for name in names if name in chosen)
