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
No wait is unbounded: a tower waits `timeout` seconds at most for what its peers send, then
raises an ExchangeError that names the towers it waited for.
A new transport subclasses Transport and registers its name in transport/__init__.py; the
equivalence tests then run on it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import ray
import torch

# How long, by default, a tower waits for what its peers send before the step fails.
EXCHANGE_TIMEOUT = 120.0


class ExchangeError(RuntimeError):
    """An exchange that could not complete: a peer that is late, failed or gone."""


@dataclass(frozen=True)
class Exchange:
    """What the coordinator hands a tower for one collective: the op, and what every tower sent
    (ObjectRefs of their `send`s, in tower order)."""

    op: str  # "all_gather" or "reduce_scatter"
    refs: list

    def describe(self, own: int, point: str) -> str:
        return f"tower {own}: the {self.op.replace('_', '-')}{f' at {point}' if point else ''}"


@dataclass
class Received:
    """What a tower got from an exchange, and what it cost to get."""

    tensors: list[torch.Tensor]
    wait_seconds: float
    foreign_bytes: int  # bytes that came from other towers
    reduced: bool = False  # the pieces were already summed on the way (a true reduce-scatter)


def to_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as it travels: contiguous, feature maps as (N, H, W, C), which for the towers'
    channels-last maps is a view, not a copy."""
    tensor = tensor.detach()
    if tensor.dim() == 4:
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.contiguous()


def from_wire(tensor: torch.Tensor) -> torch.Tensor:
    """Back to (N, C, H, W), still channels-last in memory."""
    return tensor.permute(0, 3, 1, 2) if tensor.dim() == 4 else tensor


def error_summary(error: Exception) -> str:
    """The first line of an error, without Ray's wrapping or colour codes."""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


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
    # The Ray tensor transport (with_tensor_transport) on which the inference graph hands tensors
    # from tower to tower as they are, e.g. "accelerator" (NCCL) to keep them on the GPUs; None: by value.
    graph_channel: Optional[str] = None

    def __init__(self, timeout: float = EXCHANGE_TIMEOUT):
        self.timeout = timeout  # seconds a tower waits for its peers before the step fails

    @classmethod
    def for_devices(cls, devices: str, timeout: float = EXCHANGE_TIMEOUT) -> "Transport":
        """This transport for towers on `devices` (gpu, shared-gpu or cpu)."""
        return cls(timeout=timeout)

    def describe(self) -> str:
        """The transport in use, as GetModelInfo and `alexnet-mp info` report it."""
        return self.name

    # --- the links between the towers ------------------------------------------------------------
    def connect(self, towers: Sequence, generation: int) -> None:
        """Coordinator: (re)form what links the towers, as generation `generation`; a tower that
        replaced a dead one joins like the others. Nothing to do for a transport without links."""

    def reset(self) -> None:
        """Tower: forget what was sent during an abandoned step."""

    # --- the driver ------------------------------------------------------------------------------
    @abstractmethod
    def put_images(self, images: torch.Tensor) -> Any:
        """The batch, made available to every tower; what the coordinator hands to segment 0."""

    @abstractmethod
    def compile_inference(self, towers: Sequence, segments: int) -> InferenceGraph:
        """The forward pass over the tower actors (their `infer` method), wired by all_gather."""

    # --- forward: all-gather ---------------------------------------------------------------------
    @abstractmethod
    def all_gather(self, outputs: Sequence) -> list[Exchange]:
        """Coordinator: outputs[t] is what tower t's `send` produced; returns what each tower is handed."""

    @abstractmethod
    def send(self, tensor: torch.Tensor) -> Any:
        """Tower: a segment's output (or a partial gradient) as it leaves the tower."""

    @abstractmethod
    def receive(self, delivered: Sequence, own: int, device: torch.device, point: str = "") -> Received:
        """Tower: the pieces it was handed, in tower order, on its device. `own` is its index;
        `point` names the exchange (conv3, fc6...) for error messages."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> Any:
        """Tower: a tensor leaving by value, for the coordinator or the driver (the logits, and
        what the inference graph hands on); `decode` is its inverse."""

    def await_sent(self, delivered: Exchange | Sequence, own: int, point: str) -> list:
        """Tower: the values of what it was handed, once every sender has sent; an ExchangeError
        names the senders still missing after the timeout. A sender's failure is raised at once."""
        refs = delivered.refs if isinstance(delivered, Exchange) else list(delivered)
        unique = list(dict.fromkeys(refs))
        _, late = ray.wait(unique, num_returns=len(unique), timeout=self.timeout)
        if late and isinstance(delivered, Exchange):
            towers = [t for t, ref in enumerate(refs) if ref in late]
            raise ExchangeError(f"{delivered.describe(own, point)} timed out after {self.timeout:g} s waiting for tower(s) {towers}")
        if late:  # the batch, or the loss's gradient
            raise ExchangeError(f"tower {own}: what the coordinator sent for {point} did not arrive within {self.timeout:g} s")
        return ray.get(refs)

    @abstractmethod
    def decode(self, sent: Any, device: torch.device) -> torch.Tensor:
        """Tower: one piece as the inference graph hands it over (already fetched), on its device."""

    # --- backward: reduce-scatter ----------------------------------------------------------------
    @abstractmethod
    def reduce_scatter(self, partials: Sequence[Sequence]) -> list[Exchange]:
        """Coordinator: partials[src][dst] is src's gradient for dst's output; dst is handed every src's piece."""

    def reduce(self, received: Received) -> torch.Tensor:
        """Tower: the reduce half of reduce-scatter, the sum of every tower's partial gradient."""
        if received.reduced:
            return received.tensors[0]
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
