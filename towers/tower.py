"""One tower: its share of every layer, run segment by segment between the cross-tower exchanges.

A segment is a run of layers that needs nothing from the other towers (NetConfig.segments).
The tower keeps each segment's autograd graph from forward until its backward, so the
coordinator can drive the step one exchange at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from towers.config import NetConfig
from towers.init import tower_slice_init
from towers.ops import apply_then, dropout_mask, fuse_norm_blocks


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
        self._pending: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        for s in self.config.shapes:
            weight, bias = tower_slice_init(self.config, s, self.index, seed)
            module = getattr(self, s.name)
            module.weight.copy_(weight)
            module.bias.copy_(bias)

    def forward_segment(
        self, k: int, inputs: torch.Tensor | Sequence[torch.Tensor], dropout_seed: Optional[int] = None,
        first_sample: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """Segment k's output on this tower.

        `inputs` is the image for segment 0, and for a later segment every tower's output of
        segment k-1 in tower order: the result of the all-gather. In training mode the graph is
        kept until backward_segment(k).
        """
        segment = self.config.segments[k]
        keep_graph = self.training and torch.is_grad_enabled()
        if k == 0:
            leaves, x = [], inputs.contiguous(memory_format=torch.channels_last)
        else:
            # Each gathered piece becomes a leaf, so its gradient is the piece to send back to its tower.
            leaves = [piece.detach().requires_grad_(keep_graph) for piece in inputs]
            flat = segment[0].layer.kind == "fc"
            x = torch.cat([leaf.flatten(1) if flat else leaf for leaf in leaves], dim=1)
        for s in segment:
            x = getattr(self, s.name)(x)

            def mask(s=s, batch=x.shape[0]):
                rows = s.out_split[self.index]
                return dropout_mask(dropout_seed, s.name, self.index, batch, rows, self.config.dropout, first_sample)

            x = apply_then(
                self._plans[s.name],
                x,
                groups=1,
                dropout=self.config.dropout,
                training=self.training,
                mask=mask if dropout_seed is not None else None,
            )
        if keep_graph:
            self._pending[k] = (leaves, x)
        return x.detach()

    def backward_segment(self, k: int, grad_output: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Backpropagate segment k; parameter gradients accumulate in .grad.

        Returns the gradient with respect to each tower's piece of this segment's input, in tower
        order (this tower's partial sums, for the reduce-scatter), or None for the first segment.
        """
        if k not in self._pending:
            raise RuntimeError(f"tower {self.index}: backward of segment {k} without a training forward")
        leaves, output = self._pending.pop(k)
        output.backward(grad_output)
        return [leaf.grad for leaf in leaves] if leaves else None

    def drop_pending(self) -> None:
        """Forget any graph kept for backward (after a failed or abandoned step)."""
        self._pending.clear()


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
