"""`alexnet-mp demo`: the whole system on one machine, on the built-in dataset.

It generates the built-in dataset, starts the server (and with it a local Ray) in a process of its
own, trains the full-size two-tower network with the `demo` preset through gRPC (with a live
progress bar), then classifies every held-out image through gRPC and prints the accuracy and a
few top-5 answers. The server's output, Ray's messages included, goes to its log file, which the
demo names: this console shows the demo, as a user's client would see it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from client.views import colour_lines, console, follow, pct, predictions_table


def free_or_any(host: str, port: int) -> int:
    """`port` if nothing listens there, else 0 (the system picks one)."""
    if port <= 0:
        return port
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return 0
    return port


RAY_LOGS = "/tmp/ray/session_latest/logs"  # where a local Ray keeps its processes' logs
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def as_typed(path: Path) -> str:
    """A path as the user would type it: relative where it lies under the current folder."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def observability_commands(metrics_port: int) -> list[str]:
    """How to watch this server: Prometheus on the shipped config (which scrapes :9464), and the dashboard."""
    config = DEPLOY / "prometheus" / "prometheus.yml"
    edit = "" if metrics_port == 9464 else f" (edit its target, localhost:9464, to localhost:{metrics_port})"
    return [
        f"watch it in Prometheus, alerts included{edit}:",
        f"  prometheus --config.file={as_typed(config)} --storage.tsdb.path=/tmp/alexnet-mp-prometheus",
        "then in Grafana, add that Prometheus (http://localhost:9090) "
        f"and import {as_typed(DEPLOY / 'grafana' / 'alexnet-mp.json')}",
    ]


def demo_precision(asked: str) -> str:
    """The demo's arithmetic: "auto" is bfloat16 where this machine's towers compute it (AMX or
    AVX512-BF16 on a CPU, a GPU with bf16), float32 elsewhere; anything else as asked."""
    if asked != "auto":
        return asked
    import torch

    from towers.precision import bf16_arithmetic

    return "bfloat16" if bf16_arithmetic("cuda" if torch.cuda.is_available() else "cpu") else "float32"


def serve_in_child(options, log_path: str, said) -> None:
    """The demo's server, in a process of its own (spawned: nothing is forked after gRPC starts).
    Everything it and Ray print goes to `log_path`; `said` gets its ports, or why it could not start."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from coordinator.engine.allocator import return_freed_memory
    from coordinator.service import Server

    return_freed_memory()  # as `alexnet-mp serve` does
    try:
        server = Server(options).start()
    except Exception as exc:  # noqa: BLE001 (a taken port, an unsafe setting: the demo says which)
        said.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    said.send(("serving", server.port, server.metrics_port))
    server.wait()  # until the demo's SIGTERM: jobs stop at a step boundary


class ServerProcess:
    """`serve_in_child`, started and stopped from the demo."""

    def __init__(self, options, log_path: Path):
        spawn = multiprocessing.get_context("spawn")
        ours, theirs = spawn.Pipe(duplex=False)
        self.process = spawn.Process(
            target=serve_in_child, args=(options, str(log_path), theirs), name="alexnet-mp-server"
        )
        self.process.start()
        theirs.close()
        try:
            said = ours.recv()  # EOFError: it ended without a word
        except EOFError:
            said = ("error", f"the server process ended (exit code {self.process.join(5) or self.process.exitcode})")
        if said[0] == "error":
            self.stop()
            raise RuntimeError(f"{said[1]} (its log: {log_path})")
        self.port, self.metrics_port = said[1], said[2]

    def stop(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.join(120)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def run_demo(options, preset: str = "demo", overrides: dict | None = None) -> int:
    """The demo on a server with these ServeOptions (a taken port is swapped for a free one)."""
    started = time.monotonic()
    console.rule("[bold]alexnet-mp demo: the 2012 two-tower AlexNet on Ray, served over gRPC")
    root = generate_dataset()
    val = sorted((root / "val").rglob("*.jpg"))
    console.print(
        f"dataset: {root} ({len(list((root / 'train').rglob('*.jpg')))} training, {len(val)} held-out images)"
    )
    log_path = root.parent / "demo-server.log"
    try:
        server = start_server(options, log_path)
    except RuntimeError as error:
        console.print(f"[red]the server did not start: {error}")
        return 2
    target, metrics = announce(options.host, server)
    try:
        with AlexNetClient(target) as client:
            client.wait_ready()
            print_serving(client.info())
            job = client.train(builtin=True, preset=preset, overrides=overrides)
            console.print(f"training job {job.job_id}: preset {preset}, full-size AlexNet on two towers")
            job = follow(client, job.job_id)
            if job.state != pb.FINISHED:
                return 1
            print_accuracy(root, val, *classify_held_out(client, val))
            print_where_to_look(client, job, log_path, metrics)
            console.print(f"demo wall time: {time.monotonic() - started:.0f} s")
    finally:
        server.stop()
    return 0


def generate_dataset() -> Path:
    """The built-in dataset, generated with a progress bar (at once where it exists)."""
    from coordinator.data import patterns

    with Progress(
        TextColumn("generating the built-in dataset"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        task = bar.add_task("", total=None)
        return patterns.generate(
            patterns.default_root(), progress=lambda done, total: bar.update(task, completed=done, total=total)
        )


def start_server(options, log_path: Path) -> ServerProcess:
    host = options.host
    options = dataclasses.replace(
        options, port=free_or_any(host, options.port), metrics_port=free_or_any(host, options.metrics_port)
    )
    console.print(f"starting Ray and the server (two serving towers); its log, Ray's messages included: {log_path}")
    return ServerProcess(options, log_path)


def announce(host: str, server: ServerProcess) -> tuple[str, str | None]:
    """Where the server answers: its gRPC target, and its metrics' address (None without metrics)."""
    target = f"{host}:{server.port}"
    metrics = f"http://{host}:{server.metrics_port}/metrics" if server.metrics_port else None
    console.print(
        f"gRPC on {target}" + (f"; Prometheus metrics at {metrics} (scrape them while it trains)" if metrics else "")
    )
    if metrics:
        console.print("\n".join(observability_commands(server.metrics_port)), highlight=False)
    return target, metrics


def print_serving(info) -> None:
    towers = ", ".join(f"tower {t.index} on {t.device}" for t in info.towers)
    console.print(f"serving: {towers}")
    console.print(
        f"arithmetic: {info.precision}"
        + (
            " (bf16 layers over float32 weights: this machine computes "
            "bf16; --precision float32 for the paper's arithmetic)"
            if info.precision != "float32"
            else " (this machine has no bf16 arithmetic)"
        )
    )


def classify_held_out(client, val: list[Path]) -> tuple[list, pb.ClassifyResponse]:
    """Every held-out image through gRPC, 32 a request: their results, and the last response."""
    results, response = [], None
    with Progress(
        TextColumn("classifying held-out images via gRPC"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        task = bar.add_task("", total=len(val))
        for start in range(0, len(val), 32):
            response = client.classify(val[start : start + 32], top_k=5)
            results.extend(response.results)
            bar.update(task, advance=len(response.results))
    return results, response


def print_accuracy(root: Path, val: list[Path], results: list, response: pb.ClassifyResponse) -> None:
    """A few top-5 answers, then the held-out accuracy."""
    labels = dict(line.split(" ", 1) for line in (root / "train" / "classes.txt").read_text().splitlines())
    correct = sum(r.top[0].label == labels[p.parent.name] for p, r in zip(val, results))
    picks = [len(val) * i // 3 for i in range(3)]  # three different classes (the list is by class)
    picked = pb.ClassifyResponse(
        results=[results[i] for i in picks],
        model_version=response.model_version,
        model_note=response.model_note,
    )
    console.print(predictions_table([f"{val[i].parent.name}/{val[i].name}" for i in picks], picked))
    console.rule("[bold]result")
    console.print(f"held-out accuracy through gRPC: [bold]{pct(correct / len(val))}[/] top-1 on {len(val)} images")


def print_where_to_look(client, job, log_path: Path, metrics: str | None) -> None:
    """The run's figures, Figure 3 written beside the log, and where its curves, metrics and logs are."""
    console.print(
        f"training: {job.progress.step} steps in {job.progress.elapsed_seconds:.0f} s; "
        f"validation top-1 {pct(job.progress.top1_accuracy)}, top-5 {pct(job.progress.top5_accuracy)}"
    )
    figure = client.kernels()  # of the version just served: the run's last
    figure_path = log_path.with_name("figure3.png")
    figure_path.write_bytes(figure.png)
    console.print(f"the paper's Figure 3, each tower's conv1 kernels (tower 0 above tower 1): {figure_path}")
    console.print(colour_lines(figure), highlight=False)
    tensorboard = Path(sys.executable).with_name("tensorboard")
    console.print(
        f"TensorBoard (curves, kernels every epoch, weight histograms): {tensorboard} --logdir {job.log_dir}",
        highlight=False,
    )
    if metrics:
        console.print(f"metrics: {metrics} (training, towers, exchanges, serving, gRPC)")
    console.print(f"the server's log: {log_path}; Ray's own logs: {RAY_LOGS}")
