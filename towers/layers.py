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

NETWORKS names the published variants (NetConfig.network, the recipe's `network`): the paper's
table, the 2012 code's and Caffe's bvlc_alexnet. Each table below says where it comes from and
how it differs from the paper; tests/test_variants.py holds each row against its source's lines.
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
class SpatialLRN:
    """Response normalisation within each channel, over a size x size neighbourhood (the 2012 code's
    `rnorm`): b = a / (k + alpha/size**2 * sum of a^2 over the neighbourhood centred on a) ** beta,
    the neighbourhood cut off at the map's edges. The size is odd, so the centre is a unit."""

    size: int = 5
    alpha: float = 1e-3
    beta: float = 0.75
    k: float = 1.0

    def __post_init__(self):
        if self.size < 1 or self.size % 2 == 0:
            raise ValueError(f"SpatialLRN's size must be odd and positive, got {self.size}")


@dataclass(frozen=True)
class MaxPool:
    kernel: int = 3
    stride: int = 2


@dataclass(frozen=True)
class Dropout:
    """Drops units with the network's dropout probability (NetConfig.dropout) in training."""


Op = Union[ReLU, LRN, SpatialLRN, MaxPool, Dropout]
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
    weight_std: float = 0.01  # initial weights N(0, weight_std^2) (init "paper"); the paper's 0.01 throughout


NUM_CLASSES = 0  # placeholder in `out`: filled from NetConfig.num_classes

# The paper: Krizhevsky, Sutskever and Hinton, "ImageNet Classification with Deep Convolutional
# Neural Networks" (NIPS 2012), sections 3 and 5. The default network.
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

# The 2012 code: layers/layers-145.cfg with layers/layer-params-145.cfg, in
# github.com/computerhistory/AlexNet-Source-Code: the two-GPU net (conv1a on gpu=0, conv1b on
# gpu=1, ...) whose run that params file logs, with the rate drops at epochs 25 and 51 that the
# paper preset's lr_epochs copy. How it differs from the paper:
#   - conv1's LRN takes the convolution's raw output (rnorm1 inputs=conv1a), and its ReLU comes
#     after the pooling (pool1's neuron=relu: cuda-convnet applies a layer's neuron to its output);
#   - conv2 has a second normalisation after the LRN: cnorm2, type=rnorm, within each channel over
#     5x5 pixels (SpatialLRN);
#   - conv3 to conv5 start from N(0, 0.03^2) (initW=0.03);
#   - conv5's ReLU comes after its pooling (pool3's neuron=relu), which computes the same.
# Its norms, exactly: layer.py divides cmrnorm's `scale` by `size` and the kernel's denominator is
# (minDiv + scale/size * sum of squares) ** pow, so minDiv=2 is LRN's k and scale=0.0001 its
# alpha; rnorm's `scale` is divided by size**2 and its kernel adds 1 (cuda-convnet's conv_util.cu,
# `1 + addScale * prod`; the 2012 code passes rnorm no minDiv): SpatialLRN(k=1, alpha=0.001).
# Left out, as they change nothing the net computes: tower b's fc7 takes the towers' fc6 outputs
# in the other order (inputs=hs1b,hs1a: its weights' columns permuted), and fc8 sits on one GPU.
# fmt: off
CUDA_CONVNET_2012: tuple[Layer, ...] = (
    #      name     kind    out   sees     kernel stride pad bias  then                                        std
    Layer("conv1", "conv",   96, "image", 11,    4,     0,  0.0, (LRN(), MaxPool(), ReLU())),
    Layer("conv2", "conv",  256, "own",    5,    1,     2,  1.0, (ReLU(), LRN(), SpatialLRN(), MaxPool())),
    Layer("conv3", "conv",  384, "both",   3,    1,     1,  0.0, (ReLU(),),                                  0.03),
    Layer("conv4", "conv",  384, "own",    3,    1,     1,  1.0, (ReLU(),),                                  0.03),
    Layer("conv5", "conv",  256, "own",    3,    1,     1,  1.0, (MaxPool(), ReLU()),                        0.03),
    Layer("fc6",   "fc",   4096, "both",                    bias_init=1.0, then=(ReLU(), Dropout())),
    Layer("fc7",   "fc",   4096, "both",                    bias_init=1.0, then=(ReLU(), Dropout())),
    Layer("fc8",   "fc", NUM_CLASSES, "both"),
)
# fmt: on

# Caffe's bvlc_alexnet: models/bvlc_alexnet/train_val.prototxt in github.com/BVLC/caffe, one GPU
# with group: 2 where the paper's towers keep to themselves. How it differs from the paper:
#   - LRN with k=1: the prototxt sets local_size, alpha and beta only, and LRNParameter's k
#     defaults to 1; lrn_layer.cpp's denominator is (k + alpha/size * sum of squares) ** beta, LRN's;
#   - initial biases 0.1 where the paper's are 1 (conv2, conv4, conv5, fc6, fc7);
#   - fc6 and fc7 start from N(0, 0.005^2).
# Left out: Caffe's LRN runs over all of a layer's channels at once, so the two channels on each
# side of the tower boundary are normalised with the other tower's; here, as on the 2012 code's
# GPUs, each tower normalises its own. Its recipe (biases at twice the rate, without weight decay:
# lr_mult: 2, decay_mult: 0; batch 256) is no part of the table.
# fmt: off
CAFFE_BVLC_ALEXNET: tuple[Layer, ...] = (
    #      name     kind    out   sees     kernel stride pad bias  then
    Layer("conv1", "conv",   96, "image", 11,    4,     0,  0.0, (ReLU(), LRN(k=1.0), MaxPool())),
    Layer("conv2", "conv",  256, "own",    5,    1,     2,  0.1, (ReLU(), LRN(k=1.0), MaxPool())),
    Layer("conv3", "conv",  384, "both",   3,    1,     1,  0.0, (ReLU(),)),
    Layer("conv4", "conv",  384, "own",    3,    1,     1,  0.1, (ReLU(),)),
    Layer("conv5", "conv",  256, "own",    3,    1,     1,  0.1, (ReLU(), MaxPool())),
    Layer("fc6",   "fc",   4096, "both",                    bias_init=0.1, then=(ReLU(), Dropout()), weight_std=0.005),
    Layer("fc7",   "fc",   4096, "both",                    bias_init=0.1, then=(ReLU(), Dropout()), weight_std=0.005),
    Layer("fc8",   "fc", NUM_CLASSES, "both"),
)
# fmt: on

NETWORKS: dict[str, tuple[Layer, ...]] = {
    "paper": ALEXNET_2012,
    "cuda-convnet-2012": CUDA_CONVNET_2012,
    "caffe": CAFFE_BVLC_ALEXNET,
}


def network_table(name: str) -> tuple[Layer, ...]:
    """The layer table of a published network, by its NETWORKS name; ValueError naming the choices."""
    if name not in NETWORKS:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {shown!r}")
    return NETWORKS[name]


def with_lrn(layers: tuple[Layer, ...], lrn: LRN) -> tuple[Layer, ...]:
    """The same table with every LRN replaced, e.g. Caffe's norms alone: with_lrn(ALEXNET_2012, LRN(k=1))
    (CAFFE_BVLC_ALEXNET is the whole of Caffe's variant)."""
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
