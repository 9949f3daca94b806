"""The first transport: Ray's shared-memory object store, with the towers' tensors as numpy arrays.

The coordinator only routes ObjectRefs: tensors go from one tower's process to another through
shared memory (numpy arrays are stored without pickling and read without a copy) and never pass
through the coordinator, except the logits that the loss needs. Feature maps travel as
(N, H, W, C), the towers' channels-last layout, so no copy is made on either side.

Inference uses the same all-gather wiring, compiled once into a Ray Compiled Graph: the towers
then pass activations through shared-memory channels, a hop costing tens of microseconds instead
of a task launch (docs/performance.md, classification latency).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence

import numpy as np
import ray
import torch
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import RayChannelTimeoutError

from coordinator.engine.transport.base import Exchange, ExchangeError, InferenceGraph, Received, Transport, from_wire, to_wire

logging.getLogger("ray.dag").setLevel(logging.WARNING)  # a line per graph built or torn down is noise


class ObjectStoreTransport(Transport):
    name = "object_store"

    # --- the wire format: what a tower returns from a Ray method ----------------------------------
    @staticmethod
    def encode(tensor: torch.Tensor) -> np.ndarray:
        """A numpy array, which Ray stores without pickling; feature maps as (N, H, W, C)."""
        return to_wire(tensor.to("cpu")).numpy()

    def decode(self, array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(array, torch.Tensor):  # as the inference graph's tensor channels hand it over
            return from_wire(array).to(device)
        with warnings.catch_warnings():
            # Arrays from Ray are read-only views of shared memory; nothing writes to them.
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return from_wire(tensor).to(device)

    # --- the driver ------------------------------------------------------------------------------
    def put_images(self, images: torch.Tensor) -> list[ray.ObjectRef]:
        # Boxed in a list, so Ray hands the coordinator the reference, and the pixels go only to the towers.
        return [ray.put(self.encode(images))]

    def compile_inference(self, towers: Sequence, segments: int) -> "CompiledInference":
        return CompiledInference(self, towers, segments)

    # --- forward: all-gather ---------------------------------------------------------------------
    def all_gather(self, outputs: Sequence[ray.ObjectRef]) -> list[Exchange]:
        return [Exchange("all_gather", list(outputs)) for _ in outputs]

    def send(self, tensor: torch.Tensor) -> np.ndarray:
        return self.encode(tensor)

    def receive(self, delivered: Exchange | Sequence[ray.ObjectRef], own: int, device: torch.device, point: str = "") -> Received:
        start = time.perf_counter()
        arrays = self.await_sent(delivered, own, point)
        wait = time.perf_counter() - start
        foreign = sum(a.nbytes for i, a in enumerate(arrays) if i != own)
        return Received([self.decode(a, device) for a in arrays], wait, foreign)

    # --- backward: reduce-scatter ----------------------------------------------------------------
    def reduce_scatter(self, partials: Sequence[Sequence[ray.ObjectRef]]) -> list[Exchange]:
        towers = len(partials)
        return [Exchange("reduce_scatter", [partials[src][dst] for src in range(towers)]) for dst in range(towers)]

    # --- the loss, at the coordinator --------------------------------------------------------------
    def gather(self, outputs: Sequence[ray.ObjectRef]) -> list[torch.Tensor]:
        return [self.decode(a, torch.device("cpu")) for a in ray.get(list(outputs))]

    def scatter(self, pieces: Sequence[torch.Tensor]) -> list[list[ray.ObjectRef]]:
        return [[ray.put(self.encode(piece))] for piece in pieces]


class CompiledInference(InferenceGraph):
    """The forward pass as a Ray Compiled Graph over the tower actors: images in, each tower's
    logits out. Only the process that compiles it may run it."""

    def __init__(self, transport: ObjectStoreTransport, towers: Sequence, segments: int):
        self.transport = transport
        with InputNode() as images:
            outputs = [t.infer.bind(0, images) for t in towers]
            for k in range(1, segments):
                if transport.graph_channel:  # tensors as they are, GPU to GPU; the logits come back by value
                    outputs = [o.with_tensor_transport(transport=transport.graph_channel) for o in outputs]
                outputs = [tower.infer.bind(k, *outputs) for tower in towers]  # the all-gather: every output to every tower
            self.graph = MultiOutputNode(outputs).experimental_compile()

    def run(self, images: torch.Tensor) -> torch.Tensor:
        # Ray waits 10 s for a compiled graph's result unless told, which a busy machine can exceed
        # (a validation pass beside a classification load did); the towers get the exchange timeout.
        try:
            outputs = ray.get(self.graph.execute(self.transport.encode(images)), timeout=self.transport.timeout)
        except RayChannelTimeoutError:
            raise ExchangeError(f"the inference pass got no answer from the towers within {self.transport.timeout:g} s") from None
        return torch.cat([self.transport.decode(o, torch.device("cpu")) for o in outputs], dim=1)  # cat copies out of the channels

    def close(self) -> None:
        try:
            self.graph.teardown()
        except Exception:  # already broken; the actors will be replaced or killed anyway
            pass
