"""The math of AlexNet on one device: the layer table, one tower, and the single-process reference."""

from towers.config import LayerShape, NetConfig, split_sizes
from towers.layers import (
    ALEXNET_2012,
    LRN,
    NETWORKS,
    Dropout,
    Layer,
    MaxPool,
    ReLU,
    SpatialLRN,
    frozen_layers,
    with_lrn,
)
from towers.reference import AlexNet, paper_sgd
from towers.tower import Tower, merge_state_dicts, split_state_dict

__all__ = [
    "ALEXNET_2012",
    "AlexNet",
    "Dropout",
    "LRN",
    "Layer",
    "LayerShape",
    "MaxPool",
    "NETWORKS",
    "NetConfig",
    "ReLU",
    "SpatialLRN",
    "Tower",
    "frozen_layers",
    "merge_state_dicts",
    "paper_sgd",
    "split_sizes",
    "split_state_dict",
    "with_lrn",
]
