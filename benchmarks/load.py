"""Classify under load, against a server that is training: latency, every status code, /metrics'
answers, where the CPU time goes, and what the load costs the training.

    python benchmarks/load.py                          # full width: the light load, then saturation
    python benchmarks/load.py --loads light --seconds 60
    python benchmarks/load.py --width 0.25 --serving-share 0.5

Starts `alexnet-mp serve` in its own process (loopback, a small --max-queue, metrics on), starts a
training job on a generated dataset, and measures its images/s for --seconds / 2 with no load
(again between loads and at the end: the machine's pace drifts, so each load is set against the
mean of the windows either side). The loads:
  light       4 clients, each sending one photograph and waiting 1 s after each answer;
  saturation  --clients clients sending 1-image requests back to back for --seconds;
  overflow    the same clients sending --overflow-images images per request, more than the queue
              holds: the overflow must get RESOURCE_EXHAUSTED, and nothing else may fail.
Meanwhile a scraper reads /metrics every second with a 1 s timeout, as Prometheus does, and
counts the answers. For each window it prints requests/s, p50/p99/max latency, every status
code, the scrapes answered within 1 s (and the slowest), the machine's CPU time by kind (user,
system, softirq) with its CPU pressure (PSI), each group of processes' user and system seconds
(the server, the training and serving towers, Ray's own), and training's images/s beside alone.
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
import threading
import time
import urllib.request
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
    def change(kind: str) -> str:
        return f"{before[kind]:.0f} -> {after[kind]:.0f} MiB ({(after[kind] - before[kind]) / before[kind]:+.1%})"

    return f"{change('VmRSS')}; of it anonymous {change('RssAnon')}, object store pages {change('RssShmem')}"


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def hammer(target: str, clients: int, seconds: float, images: int, image: bytes, pause: float = 0.0):
    """`clients` concurrent callers for `seconds`, each waiting `pause` s after each answer:
    (latencies of OK calls, count of each status code)."""
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
            await asyncio.sleep(pause)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.InferenceServiceStub(channel)
        await asyncio.gather(*(caller(stub) for _ in range(clients)))
    return latencies, codes


class Scraper:
    """Reads /metrics every second with a 1 s timeout, as Prometheus does; counts the answers."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.results: list[tuple[float, bool, float]] = []  # (when, answered within 1 s, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, 1.0 - (time.monotonic() % 1.0))):
            start = time.monotonic()
            try:
                urllib.request.urlopen(self.url, timeout=1.0).read()
                self.results.append((start, time.monotonic() - start <= 1.0, time.monotonic() - start))
            except OSError:
                self.results.append((start, False, time.monotonic() - start))

    def between(self, start: float, end: float) -> str:
        window = [r for r in self.results if start <= r[0] < end]
        answered = sum(ok for _, ok, _ in window)
        slowest = max((seconds for _, _, seconds in window), default=float("nan"))
        return f"/metrics {answered}/{len(window)} answered within 1 s (slowest {slowest * 1000:.0f} ms)"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def machine_cpu() -> dict:
    """The machine's CPU time so far by kind (/proc/stat, in clock ticks) and its CPU pressure total (us)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, idle, iowait, irq, softirq = map(int, fields)
    pressure = int(re.search(r"some .*total=(\d+)", Path("/proc/pressure/cpu").read_text()).group(1))
    return {
        "user": user + nice,
        "system": system,
        "softirq": softirq + irq,
        "idle": idle + iowait,
        "pressure_us": pressure,
    }


def process_group(pid: int, cmdline: str, server: int, serving: set) -> str:
    if pid == server:
        return "server"
    if "metrics_endpoint" in cmdline:
        return "metrics endpoint"
    if "TowerActor" in cmdline:
        return "serving towers" if pid in serving else "training towers"
    if cmdline.startswith("ray::"):
        return "other Ray actors and workers"
    for name in ("raylet", "gcs_server", "plasma"):
        if name in cmdline:
            return "raylet, GCS"
    if "ray" in cmdline:
        return "Ray's helpers (dashboard, log monitor)"
    return "everything else"


def processes() -> dict:
    """Every process's (command line, user s, system s)."""
    ticks, seen = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                seen[int(entry)] = (cmdline, int(stat[11]) / ticks, int(stat[12]) / ticks)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return seen


def tower_pids() -> set:
    return {pid for pid, (cmdline, _, _) in processes().items() if "TowerActor" in cmdline}


class CpuWindow:
    """Where the CPU time went between its start and `report()`: the machine's, and by process group."""

    def __init__(self, server: int, serving: set):
        self.server, self.serving = server, serving
        self.machine, self.procs = machine_cpu(), processes()
        self.started = time.monotonic()

    def report(self) -> str:
        machine, procs, seconds = machine_cpu(), processes(), time.monotonic() - self.started
        spent = {kind: machine[kind] - self.machine[kind] for kind in ("user", "system", "softirq", "idle")}
        all_ticks = sum(spent.values()) or 1
        share = ", ".join(f"{kind} {n / all_ticks:.0%}" for kind, n in spent.items())
        pressure = (machine["pressure_us"] - self.machine["pressure_us"]) / 1e6 / seconds
        groups = collections.defaultdict(lambda: [0.0, 0.0])
        for pid, (cmdline, user, system) in procs.items():
            _, user0, system0 = self.procs.get(pid, (cmdline, 0.0, 0.0))
            group = groups[process_group(pid, cmdline, self.server, self.serving)]
            group[0] += user - user0
            group[1] += system - system0
        by_group = "; ".join(
            f"{name} {u / seconds:.2f} user + {s / seconds:.2f} sys"
            for name, (u, s) in sorted(groups.items(), key=lambda g: -sum(g[1]))
            if u + s > 0.01 * seconds
        )
        return f"CPU: {share}; pressure (some) {pressure:.0%}; cores busy per group: {by_group}"


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


LIGHT_CLIENTS, LIGHT_PAUSE = 4, 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="light,saturation", help="light, saturation, or both, in that order")
    parser.add_argument("--clients", type=int, default=32, help="of the saturating load")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--width", type=float, default=1.0, help="of the served and the trained network")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--overflow-images", type=int, default=8)
    parser.add_argument("--server-args", default="", help="more `serve` arguments, e.g. '--serving-share 0.5'")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="run these load clients at this CPU niceness: on a small machine they take the cores "
        "that remote clients would not",
    )
    return parser.parse_args()


def start_server(args, folder: Path) -> subprocess.Popen:
    """`alexnet-mp serve` in a process group of its own, on ports the system picks."""
    command = ["serve", "--port", "0", "--metrics-port", "0", "--width", str(args.width)]
    command += ["--max-queue", str(args.max_queue), "--state-dir", "", "--data-root", str(folder)]
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", *command, *args.server_args.split()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "500"},
    )


def server_ports(server: subprocess.Popen) -> tuple[int, int]:
    """The gRPC and metrics ports the server says it serves on."""
    said = ""
    while not (ports := re.search(r"gRPC on \S+?:(\d+)\D.*http://[^:\s]+:(\d+)/metrics", said, re.DOTALL)):
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the server ended before it served: {said}")
        said += line  # the console may wrap its line
    return int(ports[1]), int(ports[2])


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    stopping = time.perf_counter()
    try:
        server.wait(timeout=120)
        print(f"the server stopped {time.perf_counter() - stopping:.1f} s after SIGTERM")
    except subprocess.TimeoutExpired:
        print("the server did not stop within 120 s of SIGTERM: killed")
    finally:
        os.killpg(server.pid, signal.SIGKILL) if server.poll() is None else None


def start_training(client, data: Path, width: float) -> str:
    """A long training job on the generated dataset, past its first steps; its id."""
    overrides = {"width": str(width), "epochs": "1000", "batch_size": str(BATCH)}
    job = client.train(data / "train", overrides=overrides)
    while client.get(job.job_id).progress.step < 3:
        time.sleep(0.5)
    return job.job_id


class Windows:
    """Windows of --seconds or --seconds / 2 on the training job: quiet, or under a load."""

    def __init__(self, args, client, job_id: str, server_pid: int, serving: set, scraper: Scraper, target: str):
        self.args, self.client, self.job_id, self.scraper, self.target = args, client, job_id, scraper, target
        self.server_pid, self.serving = server_pid, serving
        self.image = photo()

    def _progress(self):
        return self.client.get(self.job_id).progress

    def alone(self, when: str) -> float:
        """Training's images/s over a quiet window of --seconds / 2."""
        first, cpu, start = self._progress(), CpuWindow(self.server_pid, self.serving), time.monotonic()
        time.sleep(self.args.seconds / 2)
        rate = training_rate(first, self._progress())
        print(
            f"training alone, {when}: {rate:.1f} images/s (width {self.args.width}, batch {BATCH}); "
            f"{self.scraper.between(start, time.monotonic())}\n  {cpu.report()}",
            flush=True,
        )
        return rate

    def under(self, phase: str, clients: int, images: int, pause: float, before: float) -> tuple[float, list]:
        """Training's images/s under a load, beside the load's latencies and codes; and the server's memory."""
        first, cpu, start = self._progress(), CpuWindow(self.server_pid, self.serving), time.monotonic()
        memory = server_memory(self.server_pid)
        load = hammer(self.target, clients, self.args.seconds, images, self.image, pause)
        latencies, codes = asyncio.run(load)
        elapsed = time.monotonic() - start
        rate = training_rate(first, self._progress())
        print(
            f"{phase}: {clients} clients x {images} image(s), pause {pause:g} s, {elapsed:.0f} s: "
            f"{codes['OK'] / elapsed:.1f} OK requests/s, p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies, default=0) * 1000:.0f} ms; "
            f"codes {dict(codes)}; {self.scraper.between(start, time.monotonic())}; training {rate:.1f} images/s "
            f"({rate / before:.0%} of the window before)\n  {cpu.report()}\n  server RSS "
            f"{memory_change(memory, server_memory(self.server_pid))}",
            flush=True,
        )
        return rate, latencies


def run_loads(args, windows: Windows) -> None:
    """Each load in turn, between quiet windows; what training kept of its pace alone."""
    quiet = [windows.alone("at the start")]
    for load in args.loads.split(","):
        if load == "light":
            rate, _ = windows.under("light", LIGHT_CLIENTS, 1, LIGHT_PAUSE, quiet[-1])
            rates = [rate]
        elif load == "saturation":
            rates = [windows.under("saturation", args.clients, 1, 0.0, quiet[-1])[0]]
            windows.under("overflow", args.clients, args.overflow_images, 0.0, quiet[-1])
        else:
            raise SystemExit(f"--loads: light or saturation, not {load!r}")
        quiet.append(windows.alone(f"after the {load} load"))
        pace = statistics.mean(quiet[-2:])
        print(
            f"=> {load}: training kept {rates[0] / pace:.0%} of its pace alone ({pace:.1f} images/s, the mean "
            f"of the windows either side)",
            flush=True,
        )


def main() -> None:
    args = parse_args()

    from client import AlexNetClient
    from coordinator.data.patterns import generate

    folder = Path(tempfile.mkdtemp(prefix="alexnet-mp-load-"))
    data = generate(folder / "patterns", train_per_class=60, val_per_class=6)
    server, scraper = start_server(args, folder), None
    try:
        grpc_port, metrics_port = server_ports(server)
        target, scraper = f"127.0.0.1:{grpc_port}", Scraper(metrics_port)
        with AlexNetClient(target, timeout=60) as client:
            client.wait_ready()
            serving = tower_pids()  # the serving pair starts with the server; the training pair with the job
            job_id = start_training(client, data, args.width)
            print(f"server pid {server.pid}; serving towers {sorted(serving)}", flush=True)
            windows = Windows(args, client, job_id, server.pid, serving, scraper, target)
            os.nice(args.client_nice)  # after the server started: it keeps priority 0
            run_loads(args, windows)
            client.stop(job_id)
    finally:
        if scraper is not None:
            scraper.close()
        stop_server(server)


if __name__ == "__main__":
    main()
