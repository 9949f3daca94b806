"""Coordinator: the Ray actor that runs one training step across the towers.

Forward, it submits every segment of every tower at once: each call carries what the transport's
all-gather hands that tower, so the towers pull what they need as soon as it exists and the
coordinator does not sit between segments. It waits only for the logits, applies the loss, and
submits the whole backward the same way (the reduce-scatter), then the update.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import ray
import torch
import torch.nn.functional as F

from coordinator.engine.replicas import in_groups, link_replicas
from coordinator.engine.transport import Transport, error_summary
from towers import NetConfig


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    leaf = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(leaf, labels)
    loss.backward()
    return loss.item(), leaf.grad


class TowerFailure(RuntimeError):
    """A step that failed because towers died or stopped answering; `towers` are their indices.
    before_update: the step failed in its forward or backward, so no tower applied an update."""

    def __init__(self, message: str, towers: list[int], before_update: bool = False):
        super().__init__(message)
        self.towers, self.before_update = towers, before_update

    def __reduce__(self):  # Ray pickles it on its way to the driver
        return TowerFailure, (str(self), self.towers, self.before_update)


# How long a tower may take to answer a liveness check after a failed step.
PROBE_SECONDS = 10.0


def unanswered(probes: list) -> dict[int, str]:
    """Which towers did not answer their probe (a call to each, in tower order), and why ("died")."""
    ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_SECONDS)
    lost = {}
    for t, probe in enumerate(probes):
        if probe not in ready:
            lost[t] = f"did not answer within {PROBE_SECONDS:g} s"
            continue
        try:
            ray.get(probe)
        except ray.exceptions.RayActorError:
            lost[t] = "died"
    return lost


def named(lost: dict[int, str]) -> str:
    """unanswered()'s towers as a phrase: "tower 1 died; tower 0 did not answer within 10 s"."""
    return "; ".join(f"tower {t} {why}" for t, why in lost.items())


class Coordinator:
    """Runs each step on every data-parallel group of towers (one group unless replicas > 1):
    towers[g * T : (g + 1) * T] are group g's T towers, and take its shard of the batch."""

    def __init__(self, towers: Sequence, config: NetConfig, transport: Transport, replicas: int = 1):
        self.config = config
        self.transport = transport
        self.replicas = replicas
        self.segments = len(config.segments)
        self.seconds = {"loss": 0.0, "dispatch": 0.0}
        self.generation = -1
        self.relink = False  # set when a step failed with towers that did not answer: link again first
        self.towers: list = []
        self.connect(towers)  # a constructor's error reaches the engine at its first call

    def connect(self, towers: Sequence) -> int:
        """Link these towers through the transport, as its next generation (a replaced tower rejoins).

        Every tower must answer first: one that is dead or hung is named in a TowerFailure, and
        the others are not asked to wait for it.
        """
        self.towers = list(towers)
        lost = unanswered([t.describe.remote() for t in self.towers])
        if lost:
            self.relink = True
            raise TowerFailure(f"cannot link the towers: {named(lost)}", list(lost))
        self.generation += 1
        for group in self.groups:
            self.transport.connect(group, self.generation)
        link_replicas(self.groups, self.generation)
        self.relink = False
        return self.generation

    @property
    def groups(self) -> list[list]:
        return in_groups(self.towers, self.config.towers)

    def ping(self) -> int:
        """Liveness, touching no tower: the generation of the links."""
        return self.generation

    def _forward(self, towers: list, images, dropout_seed: Optional[int], first_sample: int) -> list:
        """One group's forward on its shard, whose first sample is the step's `first_sample`."""
        outputs = [t.forward.remote(0, images, dropout_seed, first_sample) for t in towers]
        for k in range(1, self.segments):
            delivered = self.transport.all_gather(outputs)
            outputs = [tower.forward.remote(k, delivered[t], dropout_seed, first_sample) for t, tower in enumerate(towers)]
        return outputs

    def _backward(self, towers: list, delivered: list) -> list:
        """One group's backward, from the loss's gradient down to segment 0; what to wait for."""
        for k in range(self.segments - 1, 0, -1):
            partials = [
                tower.backward.options(num_returns=len(towers)).remote(k, delivered[t]) for t, tower in enumerate(towers)
            ]
            delivered = self.transport.reduce_scatter(partials)
        return [tower.backward.remote(0, delivered[t]) for t, tower in enumerate(towers)]

    def forward_backward(self, shards: list, labels: list, dropout_seed: Optional[int]) -> float:
        """Forward and backward of one batch, given as each group's shard (images as the transport
        put them, and labels); gradients are left accumulated in the towers. Returns the batch's loss."""
        if self.relink:
            self.connect(self.towers)
        try:
            start = time.perf_counter()
            firsts = np.cumsum([0] + [len(shard) for shard in labels[:-1]])
            outputs = [self._forward(group, images, dropout_seed, int(first))
                       for group, images, first in zip(self.groups, shards, firsts)]  # fmt: skip
            self.seconds["dispatch"] += time.perf_counter() - start
            losses, done = [], []
            for group, out, shard_labels in zip(self.groups, outputs, labels):
                # The one tensor that reaches the coordinator: the loss needs all the logits.
                logits = torch.cat(self.transport.gather(out), dim=1)
                start = time.perf_counter()
                loss, grad = softmax_cross_entropy(logits, torch.tensor(shard_labels, dtype=torch.long))
                delivered = self.transport.scatter(torch.split(grad, list(self.config.shapes[-1].out_split), dim=1))
                self.seconds["loss"] += time.perf_counter() - start
                start = time.perf_counter()
                done += self._backward(group, delivered)
                self.seconds["dispatch"] += time.perf_counter() - start
                losses.append(loss)
            ray.get(done)
        except Exception as error:
            self._recover_from(error)
            raise
        return float(np.mean(losses))  # equal shards: the mean of their means is the batch's mean

    def _recover_from(self, error: Exception) -> None:
        """After a failed step: drop its remains in the towers that answer, and name those that do not.

        Raises TowerFailure when a tower died or hangs. Otherwise (the step's own error, say bad
        input) the towers stay usable, with their links formed again if an exchange broke them.
        """
        lost = unanswered([t.abandon_step.remote() for t in self.towers])
        if lost:
            self.relink = True
            raise TowerFailure(f"{named(lost)} during the step, which was abandoned ({error_summary(error)})", list(lost),
                               before_update=True) from error  # fmt: skip
        self.connect(self.towers)  # a failed collective leaves the group unusable; a new generation is cheap

    def apply_update(self, lr: Optional[float] = None) -> None:
        ray.get([t.apply_update.remote(lr) for t in self.towers])

    def train_step(self, images, labels: np.ndarray, lr: Optional[float], dropout_seed: Optional[int], with_stats=False):
        """One SGD step: its loss, and with_stats also the step's timings (as take_stats gives them)."""
        loss = self.forward_backward(images, labels, dropout_seed)
        self.apply_update(lr)
        return (loss, self.take_stats()) if with_stats else loss

    def take_stats(self) -> dict:
        """Timings since the last call: each tower's, and the coordinator's own; and the transport."""
        towers = ray.get([t.take_stats.remote() for t in self.towers])
        own, self.seconds = self.seconds, {"loss": 0.0, "dispatch": 0.0}
        return {"towers": towers, "replicas": self.replicas, "coordinator_seconds": own, "transport": self.transport.describe()}

