"""Initial weights, drawn tower by tower so that a tower can make its own share alone.

Each tower's slice of each layer comes from its own generator, seeded from (seed, layer, tower).
The single-process network concatenates the same slices, so both start from identical weights
for the same seed, whatever machine each tower lives on.
"""

from __future__ import annotations

import math

import torch

from towers.config import LayerShape, NetConfig, derive_seed


def tower_slice_init(cfg: NetConfig, shape: LayerShape, tower: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one tower's share of one layer (rows of the single-process layer)."""
    rows = shape.out_split[tower]
    weight_shape = (rows, *shape.weight_shape[1:])
    gen = torch.Generator().manual_seed(derive_seed(seed, "init", shape.name, tower))
    if cfg.init == "paper":
        # Krizhevsky et al. 2012, section 5: weights from N(0, 0.01^2), biases 1 where the table says so;
        # a variant's table sets its own (towers.layers).
        weight = torch.randn(weight_shape, generator=gen) * shape.layer.weight_std
        bias = torch.full((rows,), float(shape.layer.bias_init))
    elif cfg.init == "kaiming":
        # He et al. 2015: N(0, 2/fan_in) keeps activations' scale through ReLUs; zero biases. The last
        # layer starts at zero, so every class starts equally likely and early steps stay small.
        last = shape.index == len(cfg.shapes) - 1
        weight = torch.randn(weight_shape, generator=gen) * (0.0 if last else math.sqrt(2.0 / shape.fan_in))
        bias = torch.zeros(rows)
    else:  # "pytorch": what nn.Conv2d / nn.Linear draw by default
        bound = 1.0 / math.sqrt(shape.fan_in)
        weight = (torch.rand(weight_shape, generator=gen) * 2 - 1) * bound
        bias = (torch.rand((rows,), generator=gen) * 2 - 1) * bound
    return weight, bias
