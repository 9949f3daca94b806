"""Helpers for proving the towers equal to the single-process reference.

Max-pooling sends each window's gradient to its largest input. Where two inputs of a window are
equal to within float32 rounding, two correct implementations that round differently (oneDNN
channels-last convolutions and the fused LRN kernel on one side, plain PyTorch on the other) may
each pick a different one, and both answers are right. Float32 gradient comparisons therefore
run on inputs whose pooling windows all have a clear winner in the reference: a gap of 1e-5 of
the layer's largest activation, about ten times the largest difference measured between the two
sides' pooling inputs at small width. Float64 runs need no such care.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from towers import AlexNet, MaxPool, NetConfig, Tower
from towers.ops import apply_then


def smallest_pool_margin(reference: AlexNet, images: torch.Tensor) -> float:
    """The smallest gap between a pooling window's two largest inputs, over every window with a
    positive maximum, as a fraction of that layer's largest activation. (Windows of zeros are
    exact ties that both sides resolve alike, and ReLU then blocks their gradient.)"""
    cfg, x, smallest = reference.config, images, float("inf")
    with torch.no_grad():
        for s in cfg.shapes:
            if s.layer.kind == "fc":
                x = x.flatten(1)
            x = getattr(reference, s.name)(x)
            for op in s.layer.then:
                if isinstance(op, MaxPool):
                    windows = F.unfold(x.flatten(0, 1).unsqueeze(1), op.kernel, stride=op.stride)
                    top = windows.topk(2, dim=1).values
                    positive = top[:, 0] > 0
                    if positive.any():
                        gap = (top[:, 0] - top[:, 1])[positive].min() / x.abs().max()
                        smallest = min(smallest, gap.item())
                x = apply_then((op,), x, groups=cfg.towers, dropout=cfg.dropout, training=False)
    return smallest


def clear_pool_winners(reference: AlexNet, batch: int, first_seed: int = 0, margin: float = 1e-5, tries: int = 50):
    """Deterministic random images (and a seed) on which every pooling window has a clear winner."""
    size = reference.config.image_size
    for seed in range(first_seed, first_seed + tries):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        images = images.to(next(reference.parameters()).dtype)
        if smallest_pool_margin(reference, images) >= margin:
            return images, seed
    raise AssertionError(f"no input among {tries} seeds had every pooling window clear by {margin}")


def towers_in_process(config: NetConfig, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Eval-mode logits of the towers run side by side in this process, the exchange done by hand."""
    towers = [Tower(config, t, seed).eval() for t in range(config.towers)]
    with torch.no_grad():
        outputs = [t.run_segment(0, images) for t in towers]
        for k in range(1, len(config.segments)):
            joined = torch.cat(outputs, dim=1)  # the all-gather
            outputs = [t.run_segment(k, joined) for t in towers]
    return torch.cat(outputs, dim=1)
