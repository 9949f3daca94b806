"""The parameter-free operations of the table's `then` column, shared by the towers and the reference."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from towers.config import derive_seed
from towers.kernels import NormBlock, fused_norm
from towers.layers import LRN, Dropout, MaxPool, Op, ReLU, SpatialLRN


def local_response_norm(x: torch.Tensor, op: LRN, groups: int = 1) -> torch.Tensor:
    """LRN that never looks across a tower boundary: channels are normalised within each of `groups` blocks."""
    if groups == 1:
        return F.local_response_norm(x, op.size, op.alpha, op.beta, op.k)
    n, c, h, w = x.shape
    # (N, C, H, W) -> (N*groups, C/groups, H, W) is a view that puts each tower's channels in its own sample.
    y = F.local_response_norm(x.reshape(n * groups, c // groups, h, w), op.size, op.alpha, op.beta, op.k)
    return y.reshape(n, c, h, w)


def spatial_response_norm(x: torch.Tensor, op: SpatialLRN) -> torch.Tensor:
    """Each unit divided by (k + alpha/size^2 * the sum of squares in its size x size neighbourhood,
    in its own channel) ** beta: an average pool that counts the zero padding is that sum / size^2."""
    squares = F.avg_pool2d(x * x, op.size, stride=1, padding=op.size // 2, count_include_pad=True)
    return x / (op.k + op.alpha * squares) ** op.beta


def dropout_mask(
    seed: int, layer: str, tower: int, batch: int, features: int, p: float, first: int = 0, device=None
) -> torch.Tensor:
    """The (batch, features) mask one tower applies after `layer`: 0 or 1/(1-p), reproducible from the seed.

    Each sample's row is drawn from its own seed, by its place in the step's whole batch (`first`
    is the place of this batch's first sample): a batch split among data-parallel replicas gets
    the rows it would have had whole. The rows are drawn on `device` (the CPU by default), with
    that device's generator: the same masks for the same seed and device, whichever process draws
    them. The single-process reference concatenates the towers' masks, so both can be run with
    identical masks.
    """
    device = torch.device(device or "cpu")

    def row(i: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(derive_seed(seed, "dropout", layer, tower, i))
        return torch.rand(features, generator=generator, device=device)

    rows = [row(i) for i in range(first, first + batch)]
    keep = torch.stack(rows) >= p if rows else torch.zeros((0, features), dtype=torch.bool, device=device)
    return keep.to(torch.float32) / (1.0 - p)


def fuse_norm_blocks(ops: tuple[Op, ...]) -> list:
    """Group each [ReLU] -> LRN -> [MaxPool] run of `ops` into one NormBlock for the fused kernel."""
    plan, i = [], 0
    while i < len(ops):
        relu = isinstance(ops[i], ReLU) and i + 1 < len(ops) and isinstance(ops[i + 1], LRN)
        j = i + 1 if relu else i
        if isinstance(ops[j], LRN):
            pool = ops[j + 1] if j + 1 < len(ops) and isinstance(ops[j + 1], MaxPool) else None
            plan.append(NormBlock(relu, ops[j], pool))
            i = j + (2 if pool else 1)
        else:
            plan.append(ops[i])
            i += 1
    return plan


def apply_then(
    ops: tuple[Op, ...] | list,
    x: torch.Tensor,
    *,
    groups: int,
    dropout: float,
    training: bool,
    mask: Optional[Callable[[], torch.Tensor]] = None,
) -> torch.Tensor:
    """Apply a row's `then` ops (or a fuse_norm_blocks plan of them).

    `groups` is how many towers' channels `x` holds side by side (the reference holds them all).
    """
    for op in ops:
        if isinstance(op, NormBlock):
            x = fused_norm(x.float() if x.dtype == torch.bfloat16 else x, op)  # LRN sums in float32 (towers.precision)
        elif isinstance(op, ReLU):
            x = F.relu(x)
        elif isinstance(op, LRN):
            x = local_response_norm(x, op, groups)
        elif isinstance(op, SpatialLRN):
            x = spatial_response_norm(x.float() if x.dtype == torch.bfloat16 else x, op)  # sums in float32, as LRN
        elif isinstance(op, MaxPool):
            x = F.max_pool2d(x, op.kernel, op.stride)
        elif isinstance(op, Dropout):
            if training and dropout > 0:
                x = x * mask().to(x.device, x.dtype) if mask is not None else F.dropout(x, dropout, True)
        else:
            raise TypeError(f"unknown op in the layer table: {op!r}")
    return x
