"""alexnet-mp: serve, train, watch, classify and inspect the two-tower AlexNet.

    alexnet-mp serve [--ray-address ADDR] [--host 127.0.0.1] [--port 50051] [--metrics-port 9464]
    alexnet-mp train --data DIR [--preset demo|paper] [--set lr=0.005] [--follow]
    alexnet-mp train --builtin --follow
    alexnet-mp status [JOB]        alexnet-mp watch JOB        alexnet-mp stop JOB
    alexnet-mp classify IMAGE... [--top-k 5]
    alexnet-mp info
    alexnet-mp demo                # everything above on one machine, in under 10 minutes

Client commands talk to --target (default $ALEXNET_MP_TARGET or 127.0.0.1:50051).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alexnet_api.v1 import alexnet_pb2 as pb
from client import DEFAULT_TARGET, AlexNetClient

console = Console()
STATE = pb.JobState.Name


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


# --- client commands -----------------------------------------------------------------------------
def follow(client: AlexNetClient, job_id: str) -> pb.TrainingJob:
    """A live progress bar with loss, accuracy and images/s, until the job ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  top-1 {task.fields[top1]}  {task.fields[rate]} img/s  lr {task.fields[lr]}"),
        TextColumn("{task.fields[skipped]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("starting", total=None, loss="-", top1="-", rate="-", lr="-", skipped="")
        rate = math.nan
        for event in client.watch(job_id):
            p = event.progress
            if event.kind == pb.TrainingEvent.STEP:
                rate = p.images_per_second
            if p.steps_per_epoch and p.epochs:
                bar.update(task, total=p.steps_per_epoch * p.epochs)
            fields = dict(
                loss="-" if math.isnan(p.loss) else f"{p.loss:.3f}",
                top1=pct(p.top1_accuracy),
                rate="-" if math.isnan(rate) else f"{rate:.0f}",
                lr=f"{p.learning_rate:.2g}" if p.learning_rate else "-",
                skipped=f"skipped {p.skipped_images}" if p.skipped_images else "",
            )
            description = f"epoch {min(p.epoch + 1, p.epochs)}/{p.epochs}" if p.epochs else STATE(event.state).lower()
            bar.update(task, completed=p.step, description=description, **fields)
            if event.kind == pb.TrainingEvent.EPOCH:
                bar.console.print(
                    f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.3f}, validation top-1 {pct(p.top1_accuracy)} "
                    f"(error {pct(1 - p.top1_accuracy)}), top-5 {pct(p.top5_accuracy)}, {rate:.0f} img/s"
                )
            elif event.kind == pb.TrainingEvent.STATE and event.message and event.message != "current state":
                bar.console.print(f"[dim]{STATE(event.state).lower()}: {event.message}")
    job = client.get(job_id)
    colour = {pb.FINISHED: "green", pb.STOPPED: "yellow", pb.FAILED: "red"}.get(job.state, "white")
    console.print(f"job {job.job_id}: [{colour}]{STATE(job.state)}[/]" + (f": {job.error}" if job.error else ""))
    return job


def jobs_table(jobs) -> Table:
    table = Table("job", "state", "dataset", "step", "epoch", "loss", "top-1", "top-5", "version")
    for column in table.columns[:2]:
        column.no_wrap = True  # ids and states are read whole; the dataset path may wrap
    for job in jobs:
        p = job.progress
        dataset = "built-in" if job.spec.WhichOneof("dataset") == "builtin" else job.spec.data_dir
        table.add_row(
            job.job_id,
            STATE(job.state) + (f" ({job.error})" if job.error else ""),
            dataset,
            str(p.step),
            f"{p.epoch}/{p.epochs}",
            "-" if math.isnan(p.loss) else f"{p.loss:.3f}",
            pct(p.top1_accuracy),
            pct(p.top5_accuracy),
            str(job.model_version),
        )
    return table


def predictions_table(names, response: pb.ClassifyResponse) -> Table:
    table = Table("image", "rank", "class", "label", "probability", title=f"model version {response.model_version}: {response.model_note}")
    table.columns[0].overflow = "fold"  # a long path wraps rather than losing its file name
    for name, result in zip(names, response.results):
        for rank, p in enumerate(result.top, 1):
            table.add_row(name if rank == 1 else "", str(rank), str(p.class_index), p.label, f"{p.probability:.1%}")
    return table


def cmd_train(args) -> int:
    with AlexNetClient(args.target) as client:
        overrides = dict(item.split("=", 1) for item in args.set)
        job = client.train(
            args.data,
            builtin=args.builtin,
            val_dir=args.val or "",
            class_names_file=args.classes or "",
            preset=args.preset,
            overrides=overrides,
            checkpoint_dir=args.checkpoint_dir or "",
        )
        console.print(f"started job [bold]{job.job_id}[/] ({STATE(job.state)})")
        if args.follow:
            return 0 if follow(client, job.job_id).state in (pb.FINISHED, pb.STOPPED) else 1
    return 0


def cmd_watch(args) -> int:
    with AlexNetClient(args.target) as client:
        return 0 if follow(client, args.job).state in (pb.FINISHED, pb.STOPPED) else 1


def cmd_status(args) -> int:
    with AlexNetClient(args.target) as client:
        jobs = [client.get(args.job)] if args.job else client.list()
        if not jobs:
            console.print("no training jobs yet: start one with `alexnet-mp train`")
        else:
            console.print(jobs_table(jobs))
    return 0


def cmd_stop(args) -> int:
    with AlexNetClient(args.target) as client:
        job = client.stop(args.job)
        console.print(f"job {job.job_id}: {STATE(job.state)}")
    return 0


def cmd_classify(args) -> int:
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        console.print(f"[red]no such file: {', '.join(missing)}")
        return 2
    with AlexNetClient(args.target) as client:
        response = client.classify(args.images, top_k=args.top_k)
    console.print(predictions_table(args.images, response))
    return 0


def cmd_info(args) -> int:
    with AlexNetClient(args.target) as client:
        info = client.info()
    layers = Table("layer", "kind", "outputs", "per tower", "sees", "kernel", "then", "parameters")
    for layer in info.layers:
        kernel = f"{layer.kernel}x{layer.kernel}/{layer.stride}" if layer.kind == "conv" else ""
        layers.add_row(
            layer.name,
            layer.kind,
            str(layer.outputs),
            "+".join(map(str, layer.outputs_per_tower)),
            layer.sees,
            kernel,
            ", ".join(op.split("(")[0] for op in layer.then),
            f"{layer.parameters:,}",
        )
    console.print(layers)
    towers = Table("tower", "device", "host", "parameters")
    for tower in info.towers:
        towers.add_row(str(tower.index), tower.device, tower.host, f"{tower.parameters:,}")
    console.print(towers)
    console.print(
        f"{info.parameters:,} parameters, {len(info.classes)} classes, input {info.image_size}px; "
        f"model version {info.model_version} ({info.model_note})"
    )
    return 0


# --- server commands -----------------------------------------------------------------------------
def serve_options(args):
    from coordinator.service import ServeOptions

    return ServeOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        ray_address=args.ray_address,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        width=args.width,
    )


def cmd_serve(args) -> int:
    from coordinator.service import Server

    server = Server(serve_options(args)).start()
    console.print(
        f"alexnet-mp serving gRPC on {args.host}:{server.port}"
        + (f", metrics at http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else "")
        + "  (Ctrl-C stops; a running job stops at a step boundary)"
    )
    server.wait()
    return 0


def cmd_demo(args) -> int:
    from client.demo import run_demo

    return run_demo(args)


def add_serve_arguments(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    parser.add_argument("--ray-address", help="join this Ray cluster ('auto' on a cluster node); default: start one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="Prometheus /metrics port (-1: none)")
    parser.add_argument("--max-batch", type=int, default=32, help="images per served batch")
    parser.add_argument("--max-delay-ms", type=float, default=1.0, help="how long a lone request waits for a batch to fill")
    parser.add_argument("--width", type=float, default=1.0, help="network width (1.0 is the paper's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet-mp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address for client commands")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (a Ray driver)")
    add_serve_arguments(serve, 50051, 9464)
    serve.set_defaults(run=cmd_serve)

    train = sub.add_parser("train", help="start a training job")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="ImageFolder training folder (root/<class>/<image>)")
    source.add_argument("--builtin", action="store_true", help="the built-in pattern dataset")
    train.add_argument("--val", help="held-out validation folder (default: hold out a share of --data)")
    train.add_argument("--classes", help="class names file: lines like 'n01440764 tench'")
    train.add_argument("--preset", default="demo", choices=("demo", "paper"))
    train.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe field")
    train.add_argument("--checkpoint-dir", help="write checkpoints here after every epoch")
    train.add_argument("--follow", action="store_true", help="show a live progress bar until the job ends")
    train.set_defaults(run=cmd_train)

    watch = sub.add_parser("watch", help="follow a job's progress")
    watch.add_argument("job")
    watch.set_defaults(run=cmd_watch)

    status = sub.add_parser("status", help="list jobs, or show one")
    status.add_argument("job", nargs="?")
    status.set_defaults(run=cmd_status)

    stop = sub.add_parser("stop", help="stop a job at the next step boundary")
    stop.add_argument("job")
    stop.set_defaults(run=cmd_stop)

    classify = sub.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--top-k", type=int, default=5)
    classify.set_defaults(run=cmd_classify)

    info = sub.add_parser("info", help="the layer table, the towers and the served model")
    info.set_defaults(run=cmd_info)

    demo = sub.add_parser("demo", help="start a server, train on the built-in data, classify through gRPC")
    add_serve_arguments(demo, 50051, 9464)
    demo.add_argument("--preset", default="demo", choices=("demo", "paper"))
    demo.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe field")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.set if hasattr(args, "set") else False:
        bad = [item for item in args.set if "=" not in item]
        if bad:
            console.print(f"[red]--set takes NAME=VALUE, got {', '.join(bad)}")
            return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            console.print(f"[red]no alexnet-mp server at {args.target}: start one with `alexnet-mp serve`")
        else:
            console.print(f"[red]{exc.code().name}: {exc.details()}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
