"""Classify under load, against a server that is training: throughput, latency, every status code,
the server's memory, and what the load costs the training.

    python benchmarks/load.py                          # 32 clients x 60 s, then 60 s beyond the queue
    python benchmarks/load.py --clients 32 --seconds 60 --width 0.25
    python benchmarks/load.py --serving-nice 0        # serving and training share the CPUs equally

Starts `alexnet-mp serve` in its own process (loopback, a small --max-queue), starts a training
job on a generated dataset, and measures its images/s for --seconds / 2 with no load. Then:
  load      --clients concurrent grpc.aio clients, each sending 1-image Classify requests
            back to back for --seconds;
  overflow  the same clients sending --overflow-images images per request, more than the queue
            holds: the overflow must get RESOURCE_EXHAUSTED, and nothing else may fail.
Between the two, a second quiet window: the machine's own pace drifts from minute to minute, so
the load is set against the mean of the windows before and after it. For each phase it prints
requests/s, p50/p99 latency, the count of every status code, the server's RSS at the start and
end (its heap and the object store's pages apart), and the training's images/s beside alone.
Not a test: a run. grpc.aio (part of grpcio) drives the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from alexnet_api.v1 import alexnet_pb2 as pb  # the project as installed (make install), like every benchmark
from alexnet_api.v1 import alexnet_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int, kind: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS), or a part of it: RssAnon (its own heap), RssShmem
    (shared memory it has touched: Ray's object store, mapped into every Ray process)."""
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(rf"{kind}:\s+(\d+)", status.read()).group(1)) / 1024


def server_memory(pid: int) -> dict:
    return {kind: rss_mib(pid, kind) for kind in ("VmRSS", "RssAnon", "RssShmem")}


def memory_change(before: dict, after: dict) -> str:
    change = lambda kind: f"{before[kind]:.0f} -> {after[kind]:.0f} MiB ({(after[kind] - before[kind]) / before[kind]:+.1%})"  # noqa: E731
    return f"{change('VmRSS')}; of it anonymous {change('RssAnon')}, object store pages {change('RssShmem')}"


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def hammer(target: str, clients: int, seconds: float, images: int, image: bytes):
    """`clients` concurrent callers for `seconds`: (latencies of OK calls, count of each status code)."""
    latencies, codes = [], collections.Counter()
    request = pb.ClassifyRequest(images=[pb.Image(encoded=image)] * images, top_k=1)
    stop_at = time.perf_counter() + seconds

    async def caller(stub):
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await stub.Classify(request, timeout=30)
                latencies.append(time.perf_counter() - start)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.05)  # the backoff the message asks for

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.InferenceServiceStub(channel)
        await asyncio.gather(*(caller(stub) for _ in range(clients)))
    return latencies, codes


BATCH = 32  # the training job's


def training_rate(first, last) -> float:
    """Training images/s between two of the job's progress reports."""
    return (last.step - first.step) * BATCH / max(last.elapsed_seconds - first.elapsed_seconds, 1e-9)


def photo() -> bytes:
    """A 300x260 JPEG of noise: decoding and resizing cost what a photo's do."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--width", type=float, default=0.25, help="of the served and the trained network")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--overflow-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the load phase this many times back to back (the server's memory after each)")
    parser.add_argument("--serving-nice", type=int, default=19, help="the server's --serving-nice (and its default)")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="run these load clients at this CPU niceness: on a small machine they take the cores "
                             "that remote clients would not")  # fmt: skip
    args = parser.parse_args()

    from client import AlexNetClient
    from coordinator.data.patterns import generate

    folder = Path(tempfile.mkdtemp(prefix="alexnet-mp-load-"))
    data = generate(folder / "patterns", train_per_class=60, val_per_class=6)
    server = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "serve", "--port", "0", "--metrics-port", "-1", "--width", str(args.width),
         "--max-queue", str(args.max_queue), "--serving-nice", str(args.serving_nice), "--state-dir", "", "--data-root", str(folder)],  # fmt: skip
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    target = "127.0.0.1:" + re.search(r":(\d+)", server.stdout.readline()).group(1)
    try:
        with AlexNetClient(target, timeout=60) as client:
            overrides = {"width": str(args.width), "epochs": "1000", "batch_size": str(BATCH)}
            job = client.train(data / "train", overrides=overrides)
            while client.get(job.job_id).progress.step < 3:
                time.sleep(0.5)

            def alone(when: str) -> float:
                """Training's images/s over a quiet window of --seconds / 2, and the server's memory meanwhile."""
                first, memory = client.get(job.job_id).progress, server_memory(server.pid)
                time.sleep(args.seconds / 2)
                rate = training_rate(first, client.get(job.job_id).progress)
                print(f"training alone, {when}: {rate:.1f} images/s (width {args.width}, batch {BATCH}); server RSS "
                      f"meanwhile {memory_change(memory, server_memory(server.pid))}")  # fmt: skip
                return rate

            print(f"server pid {server.pid}")
            quiet = [alone("before the load")]
            image = photo()
            os.nice(args.client_nice)  # after the server started: it keeps priority 0
            phases = [(f"load {i + 1}/{args.rounds}" if args.rounds > 1 else "load", 1) for i in range(args.rounds)]
            under_load = []
            for phase, images in (*phases, ("overflow", args.overflow_images)):
                if phase == "overflow":  # the machine's pace drifts: the load is set against windows either side
                    quiet.append(alone("after the load"))
                    print(f"training under load, by round: {', '.join(f'{r / statistics.mean(quiet):.0%}' for r in under_load)} "
                          f"of its pace alone ({statistics.mean(quiet):.1f} images/s, the mean of the windows before and after)")  # fmt: skip
                memory = server_memory(server.pid)
                start_step = client.get(job.job_id).progress
                started = time.perf_counter()
                latencies, codes = asyncio.run(hammer(target, args.clients, args.seconds, images, image))
                elapsed = time.perf_counter() - started
                end_step = client.get(job.job_id).progress
                rate = training_rate(start_step, end_step)
                under_load.append(rate)
                print(f"{phase}: {args.clients} clients x {images} image(s), {elapsed:.0f} s: "
                      f"{codes['OK'] / elapsed:.1f} OK requests/s, p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
                      f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms; codes {dict(codes)}; server RSS "
                      f"{memory_change(memory, server_memory(server.pid))}; training {rate:.1f} "
                      f"images/s ({rate / statistics.mean(quiet):.0%} of alone); job {pb.JobState.Name(client.get(job.job_id).state)}")  # fmt: skip
            client.stop(job.job_id)
            print(f"median of the OK latencies above: {statistics.median(latencies) * 1000:.0f} ms (last phase)")
    finally:
        server.send_signal(signal.SIGTERM)
        stopping = time.perf_counter()
        try:
            server.wait(timeout=120)
            print(f"the server stopped {time.perf_counter() - stopping:.1f} s after SIGTERM")
        except subprocess.TimeoutExpired:
            print("the server did not stop within 120 s of SIGTERM: killed")
        finally:
            os.killpg(server.pid, signal.SIGKILL) if server.poll() is None else None


if __name__ == "__main__":
    main()
