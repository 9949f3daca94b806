"""Training-step throughput: the two-tower engine beside plain single-process PyTorch, in one run.

    python benchmarks/train_step.py                          # batch 128 at 227 px, 2 threads in total
    python benchmarks/train_step.py --width 0.125 --batch 8 --runs 5
    python benchmarks/train_step.py --input float            # the engine fed float pixels, not crops
    python benchmarks/train_step.py --precision bfloat16     # both sides in bf16: the engine's, and autocast

Both sides get the same total CPU threads: the reference runs with --threads threads, the engine
with --threads / towers per tower. The reference is plain PyTorch as a user would write it:
towers.AlexNet (nn.functional's LocalResponseNorm) and torch.optim.SGD with its defaults, fed
float pixels. The engine runs as the training loop drives it: its batches as the data pipeline
makes them (--input crops: uint8 crops and colour offsets, made float on the towers), the next
one submitted while a step runs; steps are timed completion to completion. Blocks of engine and
reference steps alternate (--phases) so that drift in the machine hits both alike.

Each run also times each tower's step alone (its solo compute: a copy of it, at the same
shapes, its exchanges replaced by local copies, while the other towers idle) and prints

    floor = the engine's step - the slowest tower's solo step

what the engine adds beyond its towers' compute: calls, exchanges, staging, waits on a peer,
and the driver and Ray competing with the towers for the CPUs. With --runs N every figure is
then given as the median of the N runs' medians. Also printed: the Ray calls per step, the
FLOP/s against the sgemm rate of the same run, each tower's time per stage, and the bytes
exchanged per step beside the all-gather + reduce-scatter volume they should be.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F


def sgemm_rate(threads: int, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on `threads` CPU threads or on the GPU (median of repeats)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = n if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return 2 * n**3 / statistics.median(times[1:])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pipelined_steps(engine, images, labels, n: int) -> list[float]:
    """n engine steps as the training loop runs them, each batch submitted before the previous step
    ends; their durations, completion to completion."""
    durations, pending = [], engine.submit_step(images, labels)
    last = time.perf_counter()
    for i in range(n):
        following = engine.submit_step(images, labels) if i + 1 < n else None
        pending.result()
        now = time.perf_counter()
        durations.append(now - last)
        last, pending = now, following
    return durations


def theoretical_exchange_bytes(cfg, batch: int, element: int = 4) -> dict:
    """Bytes other towers must deliver per step: all-gather forward, reduce-scatter backward, and the logits."""
    volume = {"forward": 0, "backward": 0}
    for segment in cfg.segments[:-1]:
        last = segment[-1]
        total = batch * last.out_total * last.out_size * last.out_size * element
        # all-gather: each tower receives the others' pieces; reduce-scatter: each receives T-1 partials of its own.
        volume["forward"] += (cfg.towers - 1) * total
        volume["backward"] += (cfg.towers - 1) * total
    volume["logits"] = (cfg.towers - 1) * batch * max(cfg.shapes[-1].out_split) * cfg.towers * element
    return volume


def batch_for(args, num_classes: int):
    """The same batch in the two forms: crops as the data pipeline makes them, and their float pixels."""
    from towers.inputs import crops_of

    rng = np.random.default_rng(0)
    size = args.image_size
    crops = crops_of(
        rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8),
        rng.normal(0, 5, (args.batch, 3)),
        (123.68, 116.779, 103.939),
        (58.393, 57.12, 57.375),
    )
    labels = torch.as_tensor(rng.integers(0, num_classes, args.batch))
    return crops, crops.to_tensor(), labels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="runs, each interleaved; figures are medians over them")
    parser.add_argument(
        "--phases", type=int, default=2, help="alternate engine and reference blocks this many times a run"
    )
    parser.add_argument("--solo-steps", type=int, default=3, help="each tower's steps alone, per run")
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads for each side")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--input", choices=("crops", "float"), default="crops", help="what the engine is fed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the reference's device")
    parser.add_argument("--transport", default="auto", help="the engine's: auto, gloo or nccl")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the engine's arithmetic; with bfloat16, plain PyTorch runs under torch.autocast(bfloat16)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="the engine's data-parallel groups of two towers (each gets --batch / replicas images)",
    )
    parser.add_argument(
        "--tf32", action="store_true", help="CUDA only: TensorFloat-32 matmuls and convolutions on both sides"
    )
    args = parser.parse_args()
    towers = 2 * args.replicas
    if args.threads % towers and args.threads > towers:
        parser.error(f"--threads must be a multiple of the {towers} towers")
    if args.batch % args.replicas:
        parser.error(f"--batch must be a multiple of --replicas {args.replicas}")
    return args


def network(args) -> dict:
    """The network both sides build."""
    return dict(num_classes=args.num_classes, width=args.width, image_size=args.image_size)


def start_engine(args):
    from coordinator import ModelParallelAlexNet, ensure_ray

    towers = 2 * args.replicas
    # More towers than threads: each tower still gets a thread, and the towers share the cores. The
    # local Ray a user or the server gets: its workers, the towers, at the driver's CPU priority.
    ensure_ray(num_cpus=max(args.threads, towers))
    return ModelParallelAlexNet(
        **network(args),
        cpus_per_tower=max(1, args.threads // towers),
        tf32=args.tf32,
        transport=args.transport,
        replicas=args.replicas,
        precision=args.precision,
    )


class PlainPyTorch:
    """The reference: the engine's weights in towers.AlexNet, trained as a user would write it, on
    --threads threads, on the batch's float pixels."""

    def __init__(self, args, engine, device: str, pixels, labels):
        from towers import AlexNet

        self.threads, self.device = args.threads, device
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
        # The same float32 arithmetic on both sides (PyTorch's own default has TF32 convolutions, not matmuls).
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
        self.model = AlexNet(**network(args))
        self.model.load_state_dict(engine.state_dict())
        self.model.to(device)
        # Plain PyTorch as a user writes it: the default SGD implementation, not the engine's fused one.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.pixels, self.labels = pixels.to(device), labels.to(device)

    def steps(self, n: int) -> list[float]:
        durations = []
        for _ in range(n):
            torch.set_num_threads(self.threads)
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                logits = self.model(self.pixels)
            F.cross_entropy(logits.float(), self.labels).backward()
            self.optimizer.step()
            synchronize(self.device)
            durations.append(time.perf_counter() - start)
        return durations


def timed_runs(args, engine, engine_input, labels, reference: PlainPyTorch) -> list[dict]:
    """After the warm-up, --runs runs; each run's medians."""
    pipelined_steps(engine, engine_input, labels, args.warmup)
    reference.steps(args.warmup)
    engine.take_stats()  # timings below cover the timed steps only
    per_phase = [args.steps // args.phases + (i < args.steps % args.phases) for i in range(args.phases)]
    return [timed_run(args, run, engine, engine_input, labels, reference, per_phase) for run in range(args.runs)]


def timed_run(args, run: int, engine, engine_input, labels, reference: PlainPyTorch, per_phase: list[int]) -> dict:
    """One run: engine and reference blocks alternating, then each tower alone; printed as it ends."""
    times = defaultdict(list)
    for n in per_phase:
        times["engine"] += pipelined_steps(engine, engine_input, labels, n)
        times["reference"] += reference.steps(n)
    solo = [statistics.median(s) for s in engine.solo_step_seconds(engine_input, labels, args.solo_steps)]
    engine_s, reference_s = statistics.median(times["engine"]), statistics.median(times["reference"])
    print(
        f"run {run + 1}/{args.runs}: engine {engine_s:.4f} s/step, plain PyTorch {reference_s:.4f}, "
        f"{reference_s / engine_s:.3f}x; solo towers {', '.join(f'{s:.4f}' for s in solo)}; "
        f"floor {engine_s - max(solo):.4f} s",
        flush=True,
    )
    return {
        "engine": engine_s,
        "reference": reference_s,
        "solo": max(solo),
        "solo_sum": sum(solo),
        "floor": engine_s - max(solo),
        "ratio": reference_s / engine_s,
    }


def sgemm_rates(args, device: str) -> dict:
    return {
        "one_thread": sgemm_rate(1),
        "all_threads": sgemm_rate(args.threads),
        "gpu": sgemm_rate(1, "cuda") if device == "cuda" else None,  # under the same TF32 setting
    }


def print_setup(args, engine, device: str) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(
        f"towers: {engine.placement.kind}, on {', '.join(t['device'] for t in engine.tower_info)}, exchanging over "
        f"{engine.transport}; reference on {device}; the engine fed {args.input}"
    )
    print(
        f"precision: {args.precision}"
        + (
            f" (bf16 by {engine.tower_info[0]['bf16']}; plain PyTorch under torch.autocast)"
            if args.precision == "bfloat16"
            else ""
        )
    )
    if device == "cuda":
        print(f"TF32 {'on' if args.tf32 else 'off'} on both sides")
    print(
        f"batch {args.batch} at {args.image_size} px, width {args.width}, "
        f"{args.runs} run(s) of {args.steps} timed steps, "
        f"{args.threads} threads per side"
        + (f"; {args.replicas} replica groups of {args.batch // args.replicas} images" if args.replicas > 1 else "")
    )


def print_speed(args, median: dict, stats: dict, steps: int) -> None:
    engine_s, reference_s = median["engine"], median["reference"]
    label = f"median of {args.runs} runs' medians" if args.runs > 1 else "median"
    print(f"engine    {engine_s:7.4f} s/step  {args.batch / engine_s:8.1f} images/s  ({label})")
    print(f"reference {reference_s:7.4f} s/step  {args.batch / reference_s:8.1f} images/s")
    print(f"speed-up (reference / engine): {median['ratio']:.3f}x")
    print(f"solo: slowest tower {median['solo']:.4f} s/step, the towers' sum {median['solo_sum']:.4f} s")
    print(
        f"floor (engine - slowest solo tower): {median['floor'] * 1000:.1f} ms/step"
        f"; engine / sum of solo towers: {engine_s / median['solo_sum']:.2f}"
    )
    print(f"Ray calls per step: {stats['tower_calls'] / steps:g} (one per tower; the coordinator is not on the path)")


def print_flops(args, cfg, engine, median: dict, rates: dict) -> None:
    flops = cfg.training_flops_per_image() * args.batch
    engine_s, reference_s = median["engine"], median["reference"]
    one_thread, all_threads, gpu = rates["one_thread"], rates["all_threads"], rates["gpu"]
    print(f"sgemm: {one_thread / 1e9:.0f} GFLOP/s on 1 thread, {all_threads / 1e9:.0f} GFLOP/s on {args.threads}")
    if gpu:
        print(
            f"GPU float32 matmul{' (TF32)' if args.tf32 else ''}: {gpu / 1e12:.1f} TFLOP/s; engine reaches "
            f"{flops / engine_s / gpu:.1%} of it, the reference {flops / reference_s / gpu:.1%}"
        )
    against_cpu = ""
    if engine.placement.kind == "cpu":  # GPU towers are measured against the GPU's rate above
        limit = one_thread * args.threads
        against_cpu = (
            f" = {flops / engine_s / limit:.0%} of {args.threads} x single-thread sgemm, "
            f"{flops / engine_s / all_threads:.0%} of {args.threads}-thread sgemm"
        )
    print(
        f"training: {flops / 1e9:.1f} GFLOP per step; engine {flops / engine_s / 1e9:.0f} GFLOP/s{against_cpu}; "
        f"reference {flops / reference_s / 1e9:.0f} GFLOP/s"
    )


def print_stages(args, stats: dict, steps: int) -> None:
    print("per step, seconds (compute forward/backward per stage, the update, then the waits in exchanges):")
    for t, tower in enumerate(stats["towers"]):
        compute = tower["compute_seconds"]
        stages = dict.fromkeys(stage for stage, _ in compute)
        row = "  ".join(
            f"{stage} {compute.get((stage, 'forward'), 0) / steps:.4f}"
            f"/{compute.get((stage, 'backward'), 0) / steps:.4f}"
            for stage in stages
        )
        wait = sum(tower["exchange_seconds"].values()) / steps
        allreduce = (
            f"  all-reduce {tower['allreduce_seconds'] / steps:.4f} s, {tower['allreduce_bytes'] / steps / 1e6:.1f} MB"
            if args.replicas > 1
            else ""
        )
        print(
            f"  tower {t}: {row}  update {tower['update_seconds'] / steps:.4f} | compute "
            f"{(sum(compute.values()) + tower['update_seconds']) / steps:.4f}  exchange wait {wait:.4f}{allreduce}"
        )


def print_exchange_bytes(args, cfg, stats: dict, steps: int) -> None:
    measured = defaultdict(int)
    for tower in stats["towers"]:
        for (point, direction), n in tower["exchange_bytes"].items():
            measured["logits" if point == "logits" else direction] += n
    expected = theoretical_exchange_bytes(cfg, args.batch)
    print("bytes exchanged between towers per step (measured vs all-gather + reduce-scatter theory):")
    for direction in ("forward", "backward", "logits"):
        print(f"  {direction:8s} {measured[direction] / steps / 1e6:9.3f} MB  vs {expected[direction] / 1e6:9.3f} MB")


def main() -> None:
    args = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    import ray

    engine = start_engine(args)
    crops, pixels, labels = batch_for(args, args.num_classes)
    reference = PlainPyTorch(args, engine, device, pixels, labels)
    engine_input = crops if args.input == "crops" else pixels.contiguous(memory_format=torch.channels_last)
    runs = timed_runs(args, engine, engine_input, labels, reference)
    stats = engine.take_stats()
    steps = args.runs * args.steps
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    rates = sgemm_rates(args, device)
    print()
    print_setup(args, engine, device)
    print_speed(args, median, stats, steps)
    print()
    print_flops(args, reference.model.config, engine, median, rates)
    print()
    print_stages(args, stats, steps)
    print()
    print_exchange_bytes(args, reference.model.config, stats, steps)
    engine.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
