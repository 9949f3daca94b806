"""TowerActor: the Ray actor that hosts one tower (towers.Tower) on its device, with its optimizer and timings."""

from __future__ import annotations

import hashlib
import functools
import os
import socket
import threading
import time
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import ray
import torch

from coordinator.engine.allocator import keep_freed_memory_in_heap
from coordinator.engine.replicas import ReplicaGroup
from coordinator.engine.transport import Received, Transport, to_wire
from towers import NetConfig, Tower, paper_sgd


def lower_priority(nice: int) -> None:
    """Run every thread of this process `nice` steps below the main thread's CPU priority (Ray
    starts a worker's main thread at RAY_worker_niceness, some of its own threads at 0): on
    Linux a thread's priority is its own. Threads started later (torch's pool) inherit it."""
    if nice == 0:
        return
    target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        os.setpriority(os.PRIO_PROCESS, int(tid), target)


def _locked(method):
    """Run under the actor's lock: the compiled inference graph calls in from another thread."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class TowerActor:
    """One tower of the model. The coordinator drives it one segment at a time; the transport
    carries what it sends and receives."""

    def __init__(
        self,
        config: NetConfig,
        index: int,
        transport: Transport,
        seed: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        threads: int = 1,
        dtype: torch.dtype = torch.float32,
        tf32: bool = False,
        keep_freed_memory: bool = True,
        nice: int = 0,
        replicas: Optional[ReplicaGroup] = None,
    ):
        lower_priority(nice)
        torch.set_num_threads(threads)
        self.keeps_freed_memory = keep_freed_memory and keep_freed_memory_in_heap()
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        # TF32 trades float32's last 13 mantissa bits for speed; off unless asked, so results match the reference.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        self.index = index
        self.transport = transport
        self.replicas = replicas or ReplicaGroup()  # the same tower in the other data-parallel groups
        self.tower = Tower(config, index, seed).to(self.device, dtype)
        self.optimizer = paper_sgd(self.tower, lr, momentum, weight_decay)
        # Exchange points are named by the layer that receives: conv3, fc6, fc7, fc8.
        self.points = [segment[0].name for segment in config.segments]
        self.stages = config.stage_names
        self._stats = self._empty_stats()
        self.lock = threading.Lock()

    @staticmethod
    def _empty_stats() -> dict:
        return {
            "compute_seconds": defaultdict(float),  # (stage, direction) -> s
            "exchange_seconds": defaultdict(float),  # (point, direction) -> s waiting for pieces
            "exchange_bytes": defaultdict(int),  # (point, direction) -> bytes from other towers
        }

    def describe(self) -> dict:
        return {
            "tower": self.index,
            "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),  # Ray's node, several of which may share a host
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "keeps_freed_memory": self.keeps_freed_memory,
            "parameters": sum(p.numel() for p in self.tower.parameters()),
        }

    def _timed(self, key, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stats["compute_seconds"][key] += time.perf_counter() - start
        return out

    def _record_exchange(self, key: tuple[str, str], got: Received) -> None:
        self._stats["exchange_seconds"][key] += got.wait_seconds
        self._stats["exchange_bytes"][key] += got.foreign_bytes

    @_locked
    def forward(self, k: int, delivered: Sequence, dropout_seed: Optional[int], first_sample: int = 0):
        """Segment k of a training step. `delivered` is the batch for k=0, else the all-gather of
        segment k-1's outputs; `first_sample` is the batch's place in the step's (for dropout)."""
        self.tower.train()
        got = self.transport.receive(delivered, self.index, self.device, self.points[k])
        if k == 0:
            inputs = got.tensors[0]
        else:
            inputs = got.tensors
            self._record_exchange((self.points[k], "forward"), got)
        out = self._timed((self.stages[k], "forward"), self.tower.forward_segment, k, inputs, dropout_seed, first_sample)
        return self.transport.send(out) if k + 1 < len(self.points) else self.transport.encode(out)  # logits go to the loss

    def infer(self, k: int, *pieces):
        """Segment k in eval mode, inside the inference graph: `pieces` are what the graph hands over.

        The graph runs this on a background thread of the actor; the lock keeps it apart from
        training calls and weight loads on the main thread.
        """
        inputs = [self.transport.decode(p, self.device) for p in pieces]
        with self.lock, torch.no_grad():
            self.tower.eval()
            out = self._timed((self.stages[k], "forward"), self.tower.forward_segment, k, inputs[0] if k == 0 else inputs)
            as_tensor = self.transport.graph_channel and k + 1 < len(self.points)  # the logits leave by value
            return to_wire(out) if as_tensor else self.transport.encode(out)

    @_locked
    def backward(self, k: int, delivered: Sequence):
        """Segment k's backward; `delivered` holds every tower's partial gradient for this tower's output.

        Returns this tower's partial gradients for each tower's piece of the segment's input (k > 0).
        """
        point = self.points[k + 1] if k + 1 < len(self.points) else "the loss"
        got = self.transport.receive(delivered, self.index, self.device, point)
        if k + 1 < len(self.points):  # the last segment's gradient comes from the loss, not from a tower
            self._record_exchange((self.points[k + 1], "backward"), got)
        grad = self.transport.reduce(got)
        pieces = self._timed((self.stages[k], "backward"), self.tower.backward_segment, k, grad)
        if pieces is None:
            return None
        return tuple(self.transport.send(p) for p in pieces)

    @_locked
    def apply_update(self, lr: Optional[float] = None) -> None:
        """The SGD step, on the gradients averaged with this tower's replicas (if any) first."""
        self.replicas.average([p.grad for p in self.tower.parameters() if p.grad is not None])
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @_locked
    def abandon_step(self) -> None:
        """Drop a half-done step: kept graphs and accumulated gradients."""
        self.tower.drop_pending()
        self.optimizer.zero_grad(set_to_none=True)
        self.transport.reset()

    # --- the transport's links (collective transports: see transport/collective.py) ------------
    def host_rendezvous(self):
        return self.transport.host_rendezvous()

    def join_exchange(self, address, generation: int, world: int) -> None:
        self.transport.join(address, self.index, world, generation)

    # --- the replicas' all-reduce (see replicas.py) -----------------------------------------------
    def host_replicas(self):
        return self.replicas.host()

    def join_replicas(self, address, rank: int, size: int, generation: int) -> None:
        self.replicas.join(address, rank, size, generation)

    @_locked
    def checksum(self) -> str:
        """A digest of the weights and momentum: equal in every replica group while they agree."""
        digest = hashlib.sha256()
        momentum = [s.get("momentum_buffer") for s in self.optimizer.state.values()]
        for tensor in [*self.tower.state_dict().values(), *(m for m in momentum if m is not None)]:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @_locked
    def take_stats(self) -> dict:
        stats, self._stats = self._stats, self._empty_stats()
        return {**{name: dict(values) for name, values in stats.items()}, **self.replicas.take_stats()}

    @_locked
    def gradients(self) -> dict:
        return {n: p.grad.detach().cpu().numpy() for n, p in self.tower.named_parameters() if p.grad is not None}

    @_locked
    def get_state(self) -> dict:
        return {k: v.detach().cpu().numpy() for k, v in self.tower.state_dict().items()}

    @_locked
    def set_state(self, state: dict) -> None:
        self.tower.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()})
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @_locked
    def get_optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    @_locked
    def set_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
