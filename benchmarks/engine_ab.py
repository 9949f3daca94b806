"""Two engine configurations side by side: the same steps on both, alternated, in one Ray.

    python benchmarks/engine_ab.py                                   # keep_freed_memory on against off
    python benchmarks/engine_ab.py --b '{"keep_freed_memory": false}' --blocks 6 --steps 3

--a and --b are ModelParallelAlexNet keywords as JSON. Both engines stay up for the whole run and
take turns in blocks of --steps pipelined steps (the order flips every block), so drift in the
machine and the idle cost of the other engine's actors hit both alike. Prints each side's median
step, their ratio, its towers' compute per step and their resident memory.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from train_step import pipelined_steps  # benchmarks/, which Python puts first on the path for a script here


def resident_mb(pid: int) -> float:
    """A local process's resident memory (Linux /proc), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="{}", help="engine A's keywords, JSON (default: the defaults)")
    parser.add_argument("--b", default='{"keep_freed_memory": false}', help="engine B's keywords, JSON")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="turns each engine takes")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    args = parser.parse_args()
    try:
        variants = {"A": json.loads(args.a), "B": json.loads(args.b)}
    except json.JSONDecodeError as error:
        parser.error(f"--a and --b must be JSON objects of ModelParallelAlexNet keywords: {error}")

    import ray

    from coordinator import ModelParallelAlexNet

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engines = {name: ModelParallelAlexNet(**kwargs) for name, kwargs in variants.items()}
    size = engines["A"].config.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, engines["A"].config.num_classes, (args.batch,), generator=gen)

    for engine in engines.values():  # warm-up: the third step is the first to reuse kept memory
        pipelined_steps(engine, images, labels, 3)
        engine.take_stats()
    times = {name: [] for name in engines}
    for block in range(args.blocks):
        order = list(engines) if block % 2 == 0 else list(engines)[::-1]
        for name in order:
            times[name] += pipelined_steps(engines[name], images, labels, args.steps)
        print(f"block {block + 1}/{args.blocks}", flush=True)

    print()
    steps = args.blocks * args.steps
    for name, engine in engines.items():
        compute = [sum(t["compute_seconds"].values()) / steps for t in engine.take_stats()["towers"]]
        memory = [resident_mb(t["pid"]) for t in engine.tower_info]
        print(
            f"{name} {json.dumps(variants[name])}: median {statistics.median(times[name]):.3f} s/step "
            f"(all: {', '.join(f'{t:.2f}' for t in times[name])}); towers' compute "
            f"{', '.join(f'{c:.3f}' for c in compute)} s/step; resident {', '.join(f'{m:.0f}' for m in memory)} MB"
        )
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"A is {b / a:.3f}x as fast as B (batch {args.batch}, {steps} steps each)")
    for engine in engines.values():
        engine.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
