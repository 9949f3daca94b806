"""The transport seam: how the tensors of the cross-tower exchanges travel.

At each exchange point (a layer that sees both towers: conv3, fc6, fc7, fc8) the step does one
collective, and its backward is the other, as in Megatron-LM's mappings:

  forward   all_gather:     every tower receives every tower's output, in tower order;
  backward  reduce_scatter: tower `src` holds partial gradients for every tower's output (the
                            gradients of the pieces it gathered); each tower receives the
                            pieces for its own output and sums them.

A transport owns every put, get, encode and decode of those tensors, on every side:
  the driver       puts the batch in, and runs the inference graph;
  the coordinator  routes the collectives, gathers the logits for the loss and scatters their gradient;
  each tower       sends its outputs and partial gradients, receives and reduces what it is handed.

The coordinator decides who receives what; the towers' math (towers/) knows nothing of any of it.
A new transport subclasses Transport and registers its name in transport/__init__.py; the
equivalence tests then run on it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch


@dataclass
class Received:
    """What a tower got from an exchange, and what it cost to get."""

    tensors: list[torch.Tensor]
    wait_seconds: float
    foreign_bytes: int  # bytes that came from other towers


class InferenceGraph(ABC):
    """The eval-mode forward pass, wired once over the tower actors and run many times."""

    @abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a checked batch."""

    @abstractmethod
    def close(self) -> None:
        """Release what the graph holds; safe to call on a broken graph."""


class Transport(ABC):
    name: ClassVar[str]

    # --- the driver ------------------------------------------------------------------------------
    @abstractmethod
    def put_images(self, images: torch.Tensor) -> Any:
        """The batch, made available to every tower; what the coordinator hands to segment 0."""

    @abstractmethod
    def compile_inference(self, towers: Sequence, segments: int) -> InferenceGraph:
        """The forward pass over the tower actors (their `infer` method), wired by all_gather."""

    # --- forward: all-gather ---------------------------------------------------------------------
    @abstractmethod
    def all_gather(self, outputs: Sequence) -> list[list]:
        """Coordinator: outputs[t] is what tower t's `send` produced; returns what each tower is handed."""

    @abstractmethod
    def send(self, tensor: torch.Tensor) -> Any:
        """Tower: a segment's output (or a partial gradient) as it leaves the tower."""

    @abstractmethod
    def receive(self, delivered: Sequence, own: int, device: torch.device) -> Received:
        """Tower: the pieces it was handed, in tower order, on its device. `own` is its index."""

    @abstractmethod
    def decode(self, sent: Any, device: torch.device) -> torch.Tensor:
        """Tower: one piece as the inference graph hands it over (already fetched), on its device."""

    # --- backward: reduce-scatter ----------------------------------------------------------------
    @abstractmethod
    def reduce_scatter(self, partials: Sequence[Sequence]) -> list[list]:
        """Coordinator: partials[src][dst] is src's gradient for dst's output; dst is handed every src's piece."""

    def reduce(self, received: Received) -> torch.Tensor:
        """Tower: the reduce half of reduce-scatter, the sum of every tower's partial gradient."""
        total = received.tensors[0].clone()
        for piece in received.tensors[1:]:
            total += piece
        return total

    # --- the loss, at the coordinator --------------------------------------------------------------
    @abstractmethod
    def gather(self, outputs: Sequence) -> list[torch.Tensor]:
        """Coordinator: every tower's last output (its logits), on the CPU, in tower order."""

    @abstractmethod
    def scatter(self, pieces: Sequence[torch.Tensor]) -> list[list]:
        """Coordinator: pieces[t] (dL/dlogits of tower t's classes) handed to tower t alone."""
