"""TowerActor: the Ray actor that hosts one tower (towers.Tower) on its device, with its optimiser.

Each call is a whole piece of work, its exchanges inside it (exchange.py): a training step
(forward, the loss, backward, the replicas' average and the update), or forward and backward
alone, or the update alone, or an inference pass. One call per tower per step.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import ray
import torch
import torch.nn.functional as F

from coordinator.engine.allocator import keep_freed_memory_in_heap
from coordinator.engine.exchange import exchanges
from coordinator.engine.links import EXCHANGE_TIMEOUT, ExchangePlan, Link
from towers import NetConfig, Tower, paper_sgd
from towers.inputs import Crops
from towers.precision import autocast, bf16_arithmetic, check_precision, exchange_dtype
from towers.tower import local_copies


def lower_priority(nice: int) -> None:
    """Run every thread of this process `nice` steps below the main thread's CPU priority (Ray
    starts a worker's main thread at RAY_worker_niceness, some of its own threads at 0): on
    Linux a thread's priority is its own. Threads started later (torch's pool) inherit it."""
    if nice == 0:
        return
    target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        os.setpriority(os.PRIO_PROCESS, int(tid), target)


class TowerActor:
    """One tower of the model: tower `index` of its pair, linked to the other towers of its pair
    and to its replicas by the coordinator (join)."""

    def __init__(
        self,
        config: NetConfig,
        index: int,
        seed: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        threads: int = 1,
        dtype: torch.dtype = torch.float32,
        tf32: bool = False,
        keep_freed_memory: bool = True,
        nice: int = 0,
        backend: str = "gloo",  # the pair's and the replicas'
        timeout: float = EXCHANGE_TIMEOUT,
        precision: str = "float32",
        frozen: Sequence[str] = (),
    ):
        lower_priority(nice)
        torch.set_num_threads(threads)
        self.keeps_freed_memory = keep_freed_memory and keep_freed_memory_in_heap()
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        # TF32 trades float32's last 13 mantissa bits for speed; off unless asked, so results match the reference.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        self.index, self.config, self.dtype = index, config, dtype
        self.precision = check_precision(precision)
        self.bf16 = bf16_arithmetic(self.device)  # what does bf16 here, if anything (describe says)
        self.exchange_dtype = exchange_dtype(dtype, precision)
        self.hyper = dict(momentum=momentum, weight_decay=weight_decay, frozen=tuple(frozen))
        self.tower = Tower(config, index, seed).to(self.device, dtype)
        self.optimizer = paper_sgd(self.tower, lr, **self.hyper)
        self.pair = Link("pair", "tower", backend, timeout)
        self.replicas = Link("replicas", "group", backend, timeout, size=1)
        self.plan: Optional[ExchangePlan] = None

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
            "precision": self.precision,
            "bf16": self.bf16,
        }

    def rebuild(self, config: NetConfig, seed: int, frozen: Sequence[str]) -> None:
        """This tower as another network's (other classes, width or variant), from its initialisation
        and without momentum, its optimiser leaving out the `frozen` layers, in the same process. It
        computes nothing until the coordinator has linked it for the new network (Coordinator.rebuild,
        then connect)."""
        self.config, self.plan = config, None
        self.hyper = {**self.hyper, "frozen": tuple(frozen)}
        self.tower = Tower(config, self.index, seed).to(self.device, self.dtype)
        self.optimizer = paper_sgd(self.tower, self.optimizer.defaults["lr"], **self.hyper)

    # --- the links (links.py): the coordinator forms them ---------------------------------------
    def host_link(self, name: str) -> tuple[str, int]:
        return self._link(name).host()

    def join_link(self, name: str, address, rank: int, size: int, generation: int, plan: ExchangePlan, one_host: bool):
        self.plan = plan
        self._link(name).join(address, rank, size, generation, plan.timeout, one_host)
        return self._link(name).kind

    def _link(self, name: str) -> Link:
        return {"pair": self.pair, "replicas": self.replicas}[name]

    # --- the calls of a step ----------------------------------------------------------------------
    def train_step(self, batch, labels, dropout_seed: Optional[int], first_sample: int, lr: float):
        """One SGD step on this group's shard: (its loss, this call's timings)."""
        with self._exchanges(len(labels), backward=True, update=True) as step:
            loss = self._forward_backward(step, batch, labels, dropout_seed, first_sample)
            self._update(step, lr)
        return loss, step.stats()

    def forward_backward(self, batch, labels, dropout_seed: Optional[int], first_sample: int):
        """The loss and its gradients, left accumulated for apply_update: (loss, timings)."""
        with self._exchanges(len(labels), backward=True) as step:
            loss = self._forward_backward(step, batch, labels, dropout_seed, first_sample)
        return loss, step.stats()

    def apply_update(self, lr: Optional[float] = None) -> dict:
        """The SGD step, on the gradients averaged with this tower's replicas first: its timings."""
        with self._exchanges(0, update=True) as step:
            self._update(step, lr)
        return step.stats()

    def infer(self, batch):
        """Eval-mode logits of the batch, every class (tower 0 returns them, the others None), and timings."""
        with torch.no_grad(), self._exchanges(len(batch)) as step:
            self.tower.eval()
            with autocast(self.device, self.precision):
                logits = step.gather_logits(self.tower(self._images(batch), step.gather))
            out = logits.to(_output_dtype(self.dtype)).cpu().numpy() if self.index == 0 else None
        return out, step.stats()

    def abandon_step(self) -> None:
        """Drop a half-done step: accumulated gradients, and what its exchanges still expected."""
        self.tower.zero_grad(set_to_none=True)
        for link in (self.pair, self.replicas):
            link.expect([], self.dtype)

    def _exchanges(self, batch: int, backward: bool = False, update: bool = False):
        if self.plan is None:
            raise RuntimeError(f"tower {self.index} has not been linked to its peers (the coordinator links them)")
        parameters = sum(p.numel() for p in self._trained()) if update else 0
        return exchanges(
            self.plan,
            self.pair,
            self.replicas,
            self.index,
            self.device,
            batch=batch,
            dtype=self.exchange_dtype,
            gradients=self.dtype,
            backward=backward,
            update=update,
            parameters=parameters,
        )

    def _forward_backward(self, step, batch, labels, dropout_seed, first_sample) -> float:
        self.tower.train()
        images = self._images(batch)
        with autocast(self.device, self.precision):
            logits = step.gather_logits(self.tower(images, step.gather, dropout_seed, first_sample))
        loss = F.cross_entropy(logits.to(_output_dtype(self.dtype)), torch.as_tensor(labels, device=self.device))
        loss.backward()
        step.backward_done()
        return loss.item()

    def _update(self, step, lr: Optional[float]) -> None:
        step.average([p.grad for p in self._trained() if p.grad is not None])
        step.check_flags()  # no tower updates while another failed the step
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.tower.zero_grad(set_to_none=True)  # the frozen layers' gradients too, which nothing applies
        step.updated()

    def _trained(self) -> list[torch.Tensor]:
        """The parameters the optimiser updates: all but the frozen layers' (recipe's freeze)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _images(self, batch) -> torch.Tensor:
        """The batch as it travelled (coordinator.engine.batches), on this tower's device."""
        if isinstance(batch, Crops):
            return batch.to_tensor(self.device).to(self.dtype)
        with warnings.catch_warnings():
            # Arrays from Ray are read-only views of shared memory; nothing writes to them.
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(batch)
        return pixels.permute(0, 3, 1, 2).to(self.device, self.dtype)  # (N, H, W, C) as it travels

    # --- the benchmark's floor: this tower's step alone -----------------------------------------
    def solo_steps(self, batch, labels, steps: int, dropout_seed: Optional[int] = 0) -> list[float]:
        """Seconds of each of `steps` training steps of a copy of this tower alone, at the shapes of
        the real step, its exchanges replaced by local copies: its compute, with no wait on a peer."""
        tower = copy.deepcopy(self.tower).train()
        optimizer = paper_sgd(tower, self.optimizer.param_groups[0]["lr"], **self.hyper)
        exchange, classes = local_copies(self.config.towers, self.exchange_dtype), self.config.num_classes
        target = torch.as_tensor(labels, device=self.device)
        seconds = []
        for _ in range(steps + 1):  # the first makes the momentum buffers: not timed
            start = time.perf_counter()
            with autocast(self.device, self.precision):
                logits = torch.cat([tower(self._images(batch), exchange, dropout_seed)] * self.config.towers, dim=1)
            F.cross_entropy(logits[:, :classes].to(_output_dtype(self.dtype)), target).backward()
            optimizer.step()
            tower.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]

    # --- weights ----------------------------------------------------------------------------------
    def checksum(self) -> str:
        """A digest of the weights and momentum: equal in every replica group while they agree."""
        digest = hashlib.sha256()
        momentum = [s.get("momentum_buffer") for s in self.optimizer.state.values()]
        for tensor in [*self.tower.state_dict().values(), *(m for m in momentum if m is not None)]:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def gradients(self) -> dict:
        return {n: p.grad.detach().cpu().numpy() for n, p in self.tower.named_parameters() if p.grad is not None}

    def get_state(self, layer: Optional[str] = None) -> dict:
        """This tower's weights and biases: all, or one layer's."""
        state = self.tower.state_dict()
        return {k: v.detach().cpu().numpy() for k, v in state.items() if layer is None or k.startswith(f"{layer}.")}

    def set_state(self, state: dict) -> None:
        self.tower.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()})
        self.optimizer.state.clear()
        self.tower.zero_grad(set_to_none=True)

    def get_optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def set_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss and the logits that leave a tower: float32 (from bf16 logits too), or float64 on the exactness path."""
    return torch.float64 if dtype == torch.float64 else torch.float32
