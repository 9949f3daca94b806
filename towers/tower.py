"""One tower: its share of every layer, run from the image to its share of the logits.

A segment is a run of layers that needs nothing from the other towers (NetConfig.segments).
Between two segments the tower hands its output to `exchange`, which returns every tower's
output joined on the feature dimension in tower order (the all-gather at conv3, fc6, fc7 and
fc8). The exchange is an autograd operation, so one backward from the loss runs every
exchange's backward too: the tower never sees where its peers are.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from towers.config import NetConfig
from towers.init import tower_slice_init
from towers.ops import apply_then, dropout_mask, fuse_norm_blocks

# exchange(point, x): every tower's x, joined on dim 1 in tower order; point names the layer that receives it.
Exchange = Callable[[str, torch.Tensor], torch.Tensor]


class Tower(nn.Module):
    def __init__(self, config: NetConfig, index: int, seed: int = 0):
        super().__init__()
        if not 0 <= index < config.towers:
            raise ValueError(f"tower index must be in [0, {config.towers}), got {index}")
        self.config, self.index = config, index
        for s in config.shapes:
            rows = s.out_split[index]
            if s.layer.kind == "conv":
                module = nn.Conv2d(s.in_per_tower, rows, s.layer.kernel, s.layer.stride, s.layer.pad)
            else:
                module = nn.Linear(s.in_per_tower, rows)
            self.add_module(s.name, module)
        self.reset_parameters(seed)
        # Convolutions run channels-last (oneDNN's fast layout on CPU), and each ReLU -> LRN -> pool is one kernel.
        self.to(memory_format=torch.channels_last)
        self._plans = {s.name: fuse_norm_blocks(s.layer.then) for s in config.shapes}

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        for s in self.config.shapes:
            weight, bias = tower_slice_init(self.config, s, self.index, seed)
            module = getattr(self, s.name)
            module.weight.copy_(weight)
            module.bias.copy_(bias)

    def forward(
        self, images: torch.Tensor, exchange: Exchange, dropout_seed: Optional[int] = None, first_sample: int = 0
    ) -> torch.Tensor:
        """This tower's share of the logits. `first_sample` is the batch's place in the step's
        whole batch (a data-parallel shard's), from which each sample's dropout mask is drawn."""
        x = images
        for k, segment in enumerate(self.config.segments):
            if k:
                x = exchange(segment[0].name, x)
            x = self.run_segment(k, x, dropout_seed, first_sample)
        return x

    def run_segment(
        self, k: int, x: torch.Tensor, dropout_seed: Optional[int] = None, first_sample: int = 0
    ) -> torch.Tensor:
        """Segment k on its input: the image for k = 0, else every tower's output of segment k-1, joined."""
        if k == 0:
            x = x.contiguous(memory_format=torch.channels_last)
        for s in self.config.segments[k]:
            if s.layer.kind == "fc" and x.dim() > 2:
                x = x.flatten(1)  # (channel, row, column) order, tower-major: the reference's flatten
            x = getattr(self, s.name)(x)

            def mask(s=s, batch=x.shape[0], device=x.device):
                rows = s.out_split[self.index]
                return dropout_mask(
                    dropout_seed, s.name, self.index, batch, rows, self.config.dropout, first_sample, device
                )

            x = apply_then(
                self._plans[s.name],
                x,
                groups=1,
                dropout=self.config.dropout,
                training=self.training,
                mask=mask if dropout_seed is not None else None,
            )
        return x


def local_copies(towers: int, dtype: Optional[torch.dtype] = None) -> Exchange:
    """An exchange without peers: every tower's piece is a copy of this tower's own (as `dtype`,
    what exchanges carry). A tower's step run alone at the shapes of the real one (its solo
    compute), and the same work backward."""

    def exchange(point: str, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.to(dtype or x.dtype)] * towers, dim=1)

    return exchange


def split_state_dict(state: dict, config: NetConfig) -> list[OrderedDict]:
    """The canonical (single-process) state_dict cut into each tower's rows."""
    out = [OrderedDict() for _ in range(config.towers)]
    for s in config.shapes:
        for part in ("weight", "bias"):
            key = f"{s.name}.{part}"
            if key not in state:
                raise KeyError(f"state_dict has no {key!r}")
            full = state[key]
            expected = s.weight_shape if part == "weight" else (s.out_total,)
            if tuple(full.shape) != tuple(expected):
                raise ValueError(f"{key} has shape {tuple(full.shape)}, this network needs {tuple(expected)}")
            for t, piece in enumerate(torch.split(full, list(s.out_split), dim=0)):
                out[t][key] = piece.clone()
    return out


def merge_state_dicts(per_tower: Sequence[dict], config: NetConfig) -> OrderedDict:
    """The towers' states joined back into the canonical format (the inverse of split_state_dict)."""
    merged = OrderedDict()
    for s in config.shapes:
        for part in ("weight", "bias"):
            key = f"{s.name}.{part}"
            merged[key] = torch.cat([sd[key] for sd in per_tower], dim=0)
    return merged
