"""Coordinator: the Ray actor that runs one training step across the towers.

Forward, it submits every segment of every tower at once: each call carries references to the
previous segment's outputs (the all-gather), so the towers pull what they need as soon as it
exists and the coordinator does not sit between segments. It waits only for the logits, applies
the loss, and submits the whole backward the same way (the reduce-scatter), then the update.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import ray
import torch
import torch.nn.functional as F

from coordinator.exchange import ObjectStoreExchange
from towers import NetConfig


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    leaf = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(leaf, labels)
    loss.backward()
    return loss.item(), leaf.grad


class Coordinator:
    def __init__(self, workers: Sequence, config: NetConfig):
        self.workers = list(workers)
        self.config = config
        self.exchange = ObjectStoreExchange()
        self.segments = len(config.segments)
        self.seconds = {"loss": 0.0, "dispatch": 0.0}

    def _forward(self, images: ray.ObjectRef, dropout_seed: Optional[int]):
        outputs = [w.forward.remote(0, [images], dropout_seed) for w in self.workers]
        for k in range(1, self.segments):
            delivered = self.exchange.all_gather(outputs)
            outputs = [w.forward.remote(k, delivered[t], dropout_seed) for t, w in enumerate(self.workers)]
        return outputs

    def _gather_logits(self, outputs) -> torch.Tensor:
        # The one tensor that passes through the coordinator: the loss needs all the logits.
        return torch.cat([torch.from_numpy(np.array(a)) for a in ray.get(outputs)], dim=1)

    def forward_backward(self, boxed_images: list, labels: np.ndarray, dropout_seed: Optional[int]) -> float:
        """Forward and backward of one batch; gradients are left accumulated in the towers."""
        images = boxed_images[0]  # boxed, so Ray hands over the reference and not the pixels
        try:
            start = time.perf_counter()
            outputs = self._forward(images, dropout_seed)
            self.seconds["dispatch"] += time.perf_counter() - start
            logits = self._gather_logits(outputs)
            start = time.perf_counter()
            loss, grad = softmax_cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
            fc8_split = list(self.config.shapes[-1].out_split)
            delivered = [[ray.put(g.numpy())] for g in torch.split(grad, fc8_split, dim=1)]
            self.seconds["loss"] += time.perf_counter() - start
            start = time.perf_counter()
            towers = len(self.workers)
            for k in range(self.segments - 1, 0, -1):
                partials = [
                    w.backward.options(num_returns=towers).remote(k, delivered[t]) for t, w in enumerate(self.workers)
                ]
                delivered = self.exchange.reduce_scatter(partials)
            done = [w.backward.remote(0, delivered[t]) for t, w in enumerate(self.workers)]
            self.seconds["dispatch"] += time.perf_counter() - start
            ray.get(done)
        except Exception:
            ray.get([w.abandon_step.remote() for w in self.workers])
            raise
        return loss

    def apply_update(self, lr: Optional[float] = None) -> None:
        ray.get([w.apply_update.remote(lr) for w in self.workers])

    def train_step(
        self, boxed_images: list, labels: np.ndarray, lr: Optional[float], dropout_seed: Optional[int], with_stats=False
    ):
        """One SGD step: its loss, and with_stats also the step's timings (as take_stats gives them)."""
        loss = self.forward_backward(boxed_images, labels, dropout_seed)
        self.apply_update(lr)
        return (loss, self.take_stats()) if with_stats else loss

    def take_stats(self) -> dict:
        """Timings since the last call: each tower's, and the coordinator's own."""
        towers = ray.get([w.take_stats.remote() for w in self.workers])
        own, self.seconds = self.seconds, {"loss": 0.0, "dispatch": 0.0}
        return {"towers": towers, "coordinator_seconds": own}
