"""The two candidate engines for the collective transport, prototyped on the exchanges alone (issue 12).

    python benchmarks/transport_prototypes.py              # batch 128, full width, 2 towers on CPU
    python benchmarks/transport_prototypes.py --rounds 12

One round is what a training step exchanges, with no compute: the forward all-gathers at conv3,
fc6, fc7 and fc8 (every tower's conv2, conv5, fc6 and fc7 output, full size at --batch), then
their backward reduce-scatters, driven by a coordinator actor one call per tower and point, as
the engine does. Three ways to move the tensors:

  object_store  numpy arrays through Ray's object store, ObjectRefs routed by the coordinator
                (the engine's first transport);
  ray_direct    Ray Direct Transport (alpha): tower methods return torch tensors with
                tensor_transport="gloo", over ray.experimental.collective's group; RDT allows
                one return value, so a backward call returns both partials in one object;
  torch_gloo    a torch.distributed Gloo process group among the towers (rendezvous through a
                TCPStore on tower 0): all_gather forward, reduce_scatter backward; the
                coordinator still routes a small marker per call, so order and failures propagate.

Rounds alternate between the three (order rotating), in one Ray. Prints each one's median round.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import numpy as np
import ray
import torch

from towers import NetConfig


def exchanged_shapes(batch: int) -> list[tuple[int, ...]]:
    """Each tower's output at the four exchange points: conv2 and conv5 (NCHW), fc6, fc7."""
    config = NetConfig(num_classes=1000)
    shapes = []
    for segment in config.segments[:-1]:
        last = segment[-1]
        size = last.out_size
        shapes.append(
            (batch, last.out_split[0], size, size) if last.layer.kind == "conv" else (batch, last.out_split[0])
        )
    return shapes


class Tower:
    def __init__(self, index: int, shapes, towers: int = 2):
        torch.set_num_threads(1)
        self.index, self.towers = index, towers
        self.tensors = [torch.randn(s) for s in shapes]
        self.group = None

    # --- object store ------------------------------------------------------------------------
    def os_forward(self, k: int, delivered):
        if delivered:
            ray.get(list(delivered))
        return self.tensors[k].numpy()

    def os_backward(self, k: int, delivered):
        if delivered:
            ray.get(list(delivered))
        return tuple(self.tensors[k].numpy() for _ in range(self.towers))

    def last(self, delivered):
        return len(ray.get(list(delivered)))

    # --- Ray Direct Transport ----------------------------------------------------------------
    @ray.method(tensor_transport="gloo")
    def rdt_forward(self, k: int, *pieces):
        return self.tensors[k]

    @ray.method(tensor_transport="gloo")
    def rdt_backward(self, k: int, *pieces):
        return [self.tensors[k] for _ in range(self.towers)]

    def rdt_last(self, *pieces):
        return len(pieces)

    # --- torch.distributed -------------------------------------------------------------------
    def open_store(self) -> tuple[str, int]:
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, self.towers, is_master=True, wait_for_workers=False)
        return "127.0.0.1", self.store.port

    def join(self, address: tuple[str, int]) -> None:
        store = self.store if self.index == 0 else torch.distributed.TCPStore(*address, self.towers, is_master=False)
        torch.distributed.init_process_group(
            "gloo", store=store, rank=self.index, world_size=self.towers, timeout=datetime.timedelta(seconds=60)
        )

    def pg_forward(self, k: int, markers):
        if markers:
            ray.get(list(markers))
            mine = self.tensors[k - 1]
            out = [torch.empty_like(mine) for _ in range(self.towers)]
            torch.distributed.all_gather(out, mine)
        return k

    def pg_backward(self, k: int, markers):
        if markers:
            ray.get(list(markers))
            mine = self.tensors[k + 1]
            out = torch.empty_like(mine)
            torch.distributed.reduce_scatter(out, [mine] * self.towers)
        return (k,) * self.towers


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, towers):
        from ray.experimental.collective import create_collective_group

        self.towers = towers
        # RDT looks groups up in the process that submits the calls: the coordinator makes it.
        # Ray's group is the default torch process group in each tower; the torch_gloo rounds use it too.
        create_collective_group(towers, backend="torch_gloo")

    def round(self, kind: str, points: int) -> float:
        start = time.perf_counter()
        t = self.towers
        if kind == "object_store":
            outs = [tw.os_forward.remote(0, []) for tw in t]
            for k in range(1, points):
                outs = [tw.os_forward.remote(k, outs) for tw in t]
            ray.get([tw.last.remote(outs) for tw in t])
            parts = [tw.os_backward.options(num_returns=2).remote(points - 1, []) for tw in t]
            for k in range(points - 2, -1, -1):
                parts = [
                    tw.os_backward.options(num_returns=2).remote(k, [p[i] for p in parts]) for i, tw in enumerate(t)
                ]
            ray.get([tw.last.remote([p[i] for p in parts]) for i, tw in enumerate(t)])
        elif kind == "ray_direct":
            outs = [tw.rdt_forward.remote(0) for tw in t]
            for k in range(1, points):
                outs = [tw.rdt_forward.remote(k, *outs) for tw in t]
            ray.get([tw.rdt_last.remote(*outs) for tw in t])
            parts = [tw.rdt_backward.remote(points - 1) for tw in t]
            for k in range(points - 2, -1, -1):
                parts = [tw.rdt_backward.remote(k, *parts) for tw in t]
            ray.get([tw.rdt_last.remote(*parts) for tw in t])
        else:
            outs = [tw.pg_forward.remote(0, []) for tw in t]
            for k in range(1, points + 1):
                outs = [tw.pg_forward.remote(k, outs) for tw in t]
            ray.get(outs)
            parts = [tw.pg_backward.options(num_returns=2).remote(points - 1, []) for tw in t]
            for k in range(points - 2, -2, -1):
                parts = [
                    tw.pg_backward.options(num_returns=2).remote(k, [p[i] for p in parts]) for i, tw in enumerate(t)
                ]
            ray.get([p[0] for p in parts])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per engine")
    args = parser.parse_args()
    shapes = exchanged_shapes(args.batch)
    megabytes = sum(np.prod(s) * 4 for s in shapes) / 1e6
    print(f"per tower and direction: {megabytes:.1f} MB over {len(shapes)} points ({shapes})")

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    towers = [ray.remote(enable_tensor_transport=True)(Tower).options(num_cpus=1).remote(i, shapes) for i in range(2)]
    coordinator = Coordinator.remote(towers)
    kinds = ["object_store", "ray_direct", "torch_gloo"]
    for kind in kinds:
        ray.get(coordinator.round.remote(kind, len(shapes)))  # warm-up
    times = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            times[kind].append(ray.get(coordinator.round.remote(kind, len(shapes))))
    base = statistics.median(times["object_store"])
    for kind in kinds:
        median = statistics.median(times[kind])
        print(
            f"{kind:13s} median {median * 1000:7.1f} ms/round  ({base / median:.2f}x the object store's speed)  all: "
            + ", ".join(f"{t * 1000:.0f}" for t in times[kind])
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
