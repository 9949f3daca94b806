"""Training-step throughput: the two-tower engine beside plain single-process PyTorch, in one run.

    python benchmarks/train_step.py                     # batch 128 at 227 px, 2 threads in total
    python benchmarks/train_step.py --steps 3 --batch 32  # quicker look
    python benchmarks/train_step.py --transport collective  # the towers linked by torch.distributed

Both sides get the same total CPU threads: the reference runs with --threads threads, the engine
with --threads / towers per tower. The reference is plain PyTorch as a user would write it:
towers.AlexNet (nn.functional's LocalResponseNorm) and torch.optim.SGD with its defaults.
Prints medians, their ratio, the FLOP/s achieved against the sgemm rate measured in the same
run, each tower's time per stage, and the bytes exchanged per step beside the all-gather +
reduce-scatter volume they should be.

The towers' allocator keeps freed memory for the next step (ModelParallelAlexNet's
keep_freed_memory); plain PyTorch's does not. --reference-keeps-freed-memory gives the reference
the same setting, to show how much of the gap that one setting is.

The engine runs as the training loop drives it: channels-last batches (the loader's layout), the
next one submitted while a step runs; steps are timed completion to completion. Blocks of engine
and reference steps alternate (--phases) so that drift in the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

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
    import ray

    durations, pending = [], engine.submit_step(images, labels)
    last = time.perf_counter()
    for i in range(n):
        following = engine.submit_step(images, labels) if i + 1 < n else None
        ray.get(pending)
        now = time.perf_counter()
        durations.append(now - last)
        last, pending = now, following
    return durations


def theoretical_exchange_bytes(cfg, batch: int) -> dict:
    """Bytes other towers must deliver per step: all-gather forward, reduce-scatter backward, and the logits."""
    volume = {"forward": 0, "backward": 0}
    for segment in cfg.segments[:-1]:
        last = segment[-1]
        total = batch * last.out_total * last.out_size * last.out_size * 4
        # all-gather: each tower receives the others' pieces; reduce-scatter: each receives T-1 partials of its own.
        volume["forward"] += (cfg.towers - 1) * total
        volume["backward"] += (cfg.towers - 1) * total
    volume["logits"] = 2 * batch * cfg.num_classes * 4  # to the coordinator's loss and back
    return volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--phases", type=int, default=2, help="alternate engine and reference blocks this many times")
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads for each side")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the reference's device")
    parser.add_argument("--transport", default="auto", help="the engine's: auto, object_store or collective")
    parser.add_argument("--replicas", type=int, default=1,
                        help="the engine's data-parallel groups of two towers (each gets --batch / replicas images)")  # fmt: skip
    parser.add_argument(
        "--tf32", action="store_true", help="CUDA only: TensorFloat-32 matmuls and convolutions on both sides"
    )
    parser.add_argument(
        "--reference-keeps-freed-memory",
        action="store_true",
        help="give the reference's process the allocator setting the towers use (not plain PyTorch any more)",
    )
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    import ray

    from coordinator import ModelParallelAlexNet
    from towers import AlexNet

    towers = 2 * args.replicas
    if args.threads % towers and args.threads > towers:
        parser.error(f"--threads must be a multiple of the {towers} towers")
    if args.batch % args.replicas:
        parser.error(f"--batch must be a multiple of --replicas {args.replicas}")
    net = dict(num_classes=args.num_classes, width=args.width, image_size=args.image_size)
    # More towers than threads: each tower still gets a thread, and the towers share the cores.
    ray.init(num_cpus=max(args.threads, towers), include_dashboard=False, log_to_driver=False)
    engine = ModelParallelAlexNet(**net, cpus_per_tower=max(1, args.threads // towers), tf32=args.tf32,
                                  transport=args.transport, replicas=args.replicas)  # fmt: skip
    # The same float32 arithmetic on both sides (PyTorch's own default has TF32 convolutions, not matmuls).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.reference_keeps_freed_memory:
        from coordinator.engine.allocator import keep_freed_memory_in_heap

        if not keep_freed_memory_in_heap():
            parser.error("--reference-keeps-freed-memory needs Linux with glibc")
    reference = AlexNet(**net)
    reference.load_state_dict(engine.state_dict())
    reference.to(device)
    # Plain PyTorch as a user writes it: the default SGD implementation, not the engine's fused one.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    cfg = reference.config

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen)

    images_on, labels_on = images.to(device), labels.to(device)
    # The engine gets its batches as the training loop's loader delivers them: channels-last.
    engine_images = images.contiguous(memory_format=torch.channels_last)

    def reference_step():
        torch.set_num_threads(args.threads)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(reference(images_on), labels_on)
        loss.backward()
        optimizer.step()
        synchronize(device)

    def engine_steps(n):
        return pipelined_steps(engine, engine_images, labels, n)

    def reference_steps(n):
        durations = []
        for _ in range(n):
            start = time.perf_counter()
            reference_step()
            durations.append(time.perf_counter() - start)
        return durations

    for _ in range(args.warmup):
        engine_steps(1)
        reference_steps(1)
    engine.take_stats()  # timings below cover the timed steps only
    times = defaultdict(list)
    per_phase = [args.steps // args.phases + (i < args.steps % args.phases) for i in range(args.phases)]
    for phase, n in enumerate(per_phase):
        times["engine"] += engine_steps(n)
        times["reference"] += reference_steps(n)
        print(f"phase {phase + 1}/{args.phases}: {n} steps of each", flush=True)
    stats = engine.take_stats()

    one_thread = sgemm_rate(1)
    all_threads = sgemm_rate(args.threads)
    gpu = sgemm_rate(1, "cuda") if device == "cuda" else None  # under the same TF32 setting
    engine_s, reference_s = statistics.median(times["engine"]), statistics.median(times["reference"])
    flops = cfg.training_flops_per_image() * args.batch

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(
        f"towers: {engine.placement.kind}, on {', '.join(t['device'] for t in engine.towers)}, exchanging over "
        f"{engine.transport.describe()}; reference on {device}"
    )
    towers_keep = all(t["keeps_freed_memory"] for t in engine.towers)
    print(
        f"allocator keeps freed memory: towers {'yes' if towers_keep else 'no'}, "
        f"reference {'yes' if args.reference_keeps_freed_memory else 'no (plain PyTorch)'}"
    )
    if device == "cuda":
        print(f"TF32 {'on' if args.tf32 else 'off'} on both sides")
    print(f"batch {args.batch} at {args.image_size} px, width {args.width}, {args.steps} timed steps, {args.threads} threads per side"
          + (f"; {args.replicas} replica groups of {args.batch // args.replicas} images" if args.replicas > 1 else ""))  # fmt: skip
    print(f"engine    median {engine_s:7.3f} s/step  {args.batch / engine_s:7.1f} images/s  (all: {', '.join(f'{t:.2f}' for t in times['engine'])})")
    print(f"reference median {reference_s:7.3f} s/step  {args.batch / reference_s:7.1f} images/s  (all: {', '.join(f'{t:.2f}' for t in times['reference'])})")
    print(f"speed-up (reference / engine): {reference_s / engine_s:.3f}x")
    print()
    print(f"sgemm: {one_thread / 1e9:.0f} GFLOP/s on 1 thread, {all_threads / 1e9:.0f} GFLOP/s on {args.threads}")
    if gpu:
        print(
            f"GPU float32 matmul{' (TF32)' if args.tf32 else ''}: {gpu / 1e12:.1f} TFLOP/s; "
            f"engine reaches {flops / engine_s / gpu:.1%} of it, "
            f"the reference {flops / reference_s / gpu:.1%}"
        )
    against_cpu = ""
    if engine.placement.kind == "cpu":  # GPU towers are measured against the GPU's rate above
        limit = one_thread * args.threads
        against_cpu = (
            f" = {flops / engine_s / limit:.0%} of {args.threads} x single-thread sgemm, "
            f"{flops / engine_s / all_threads:.0%} of {args.threads}-thread sgemm"
        )
    print(
        f"training: {flops / 1e9:.0f} GFLOP per step; engine {flops / engine_s / 1e9:.0f} GFLOP/s{against_cpu}; "
        f"reference {flops / reference_s / 1e9:.0f} GFLOP/s"
    )

    steps = args.steps
    print()
    print("per step, seconds (compute forward/backward per stage, then waits for exchanges):")
    for t, tower in enumerate(stats["towers"]):
        compute = tower["compute_seconds"]
        stages = dict.fromkeys(stage for stage, _ in compute)
        row = "  ".join(
            f"{stage} {compute.get((stage, 'forward'), 0) / steps:.3f}/{compute.get((stage, 'backward'), 0) / steps:.3f}"
            for stage in stages
        )
        wait = sum(tower["exchange_seconds"].values()) / steps
        allreduce = (f"  all-reduce {tower['allreduce_seconds'] / steps:.3f} s, {tower['allreduce_bytes'] / steps / 1e6:.1f} MB"
                     if args.replicas > 1 else "")  # fmt: skip
        print(f"  tower {t}: {row}  | compute {sum(compute.values()) / steps:.3f}  exchange wait {wait:.3f}{allreduce}")
    own = stats["coordinator_seconds"]
    print(f"  coordinator: loss {own['loss'] / steps:.4f}, dispatch {own['dispatch'] / steps:.4f}")

    measured = defaultdict(int)
    for tower in stats["towers"]:
        for (point, direction), n in tower["exchange_bytes"].items():
            measured[direction] += n
    expected = theoretical_exchange_bytes(cfg, args.batch)
    print()
    print("bytes exchanged between towers per step (measured vs all-gather + reduce-scatter theory):")
    for direction in ("forward", "backward"):
        print(f"  {direction:8s} {measured[direction] / steps / 1e6:9.2f} MB  vs {expected[direction] / 1e6:9.2f} MB")
    print(f"  logits to the coordinator's loss and their gradient back: {expected['logits'] / 1e6:.2f} MB")
    moved = sum(measured.values()) / steps
    waited = max(sum(tower["exchange_seconds"].values()) for tower in stats["towers"]) / steps
    print(f"  the longest exchange wait, {waited:.4f} s/step, is {moved / max(waited, 1e-9) / 1e9:.2f} GB/s for the bytes moved")
    engine.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
