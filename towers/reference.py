"""The single-process network: plain PyTorch, grouped convolutions, per-tower LRN.

This is the reference the distributed engine is proven against, and its state_dict() is the
canonical weight format: conv1..conv5 then fc6..fc8, each weight then bias.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from towers.config import NetConfig
from towers.init import tower_slice_init
from towers.ops import apply_then, dropout_mask


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, seed: int = 0, **config):
        """Extra keywords are NetConfig fields (width, image_size, towers, init, layers)."""
        super().__init__()
        self.config = NetConfig(num_classes=num_classes, dropout=dropout, **config)
        for s in self.config.shapes:
            if s.layer.kind == "conv":
                k = s.layer.kernel
                module = nn.Conv2d(s.in_total, s.out_total, k, s.layer.stride, s.layer.pad, groups=s.groups)
            else:
                module = nn.Linear(s.in_total, s.out_total)
            self.add_module(s.name, module)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The configured initialisation, made of the same per-tower slices the distributed towers draw."""
        for s in self.config.shapes:
            slices = [tower_slice_init(self.config, s, t, seed) for t in range(self.config.towers)]
            module = getattr(self, s.name)
            module.weight.copy_(torch.cat([w for w, _ in slices]))
            module.bias.copy_(torch.cat([b for _, b in slices]))

    def forward(self, x: torch.Tensor, dropout_seed: Optional[int] = None) -> torch.Tensor:
        """Logits. With `dropout_seed`, dropout uses the same masks the towers draw from that seed."""
        cfg = self.config
        for s in cfg.shapes:
            if s.layer.kind == "fc":
                x = x.flatten(1)
            x = getattr(self, s.name)(x)

            def mask(s=s, batch=x.shape[0]):
                return torch.cat(
                    [dropout_mask(dropout_seed, s.name, t, batch, n, cfg.dropout) for t, n in enumerate(s.out_split)],
                    dim=1,
                )

            x = apply_then(
                s.layer.then,
                x,
                groups=cfg.towers,
                dropout=cfg.dropout,
                training=self.training,
                mask=mask if dropout_seed is not None else None,
            )
        return x


def paper_sgd(
    model: nn.Module, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, frozen: Sequence[str] = ()
):
    """SGD as the paper trains: momentum, and weight decay on the weights (the 2012 code's `wc`), not the biases.
    The layers named in `frozen` (fine-tuning) are left out: no update, no decay, no momentum.

    The paper writes v <- 0.9 v - 0.0005 e w - e g; w <- w + v. PyTorch keeps v' = -v/e instead:
    v' <- 0.9 v' + g + 0.0005 w; w <- w - e v'. The two are the same steps while e is constant; when e
    changes, PyTorch applies the new rate to the whole velocity, the paper only to the new gradient.
    """
    trained = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] not in frozen]
    decay = [p for n, p in trained if not n.endswith("bias")]
    no_decay = [p for n, p in trained if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all parameters in one pass per tensor, much faster on a CPU tower than
    # the per-parameter loop (docs/performance.md, "Training step").
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
