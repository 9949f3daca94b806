"""What the CLI and the demo show: tables, and the live view of a training job."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alexnet_api.v1 import alexnet_pb2 as pb

console = Console()
STATE = pb.JobState.Name


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def follow(client, job_id: str) -> pb.TrainingJob:
    """A live progress bar with loss, accuracy and images/s, until the job ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  top-1 {task.fields[top1]}  {task.fields[rate]} img/s  lr {task.fields[lr]}"
        ),
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
            elif event.kind == pb.TrainingEvent.RECOVERED:
                bar.console.print(f"[yellow]recovered: {event.message}")
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
    table = Table(
        "image",
        "rank",
        "class",
        "label",
        "probability",
        title=f"model version {response.model_version}: {response.model_note}",
    )
    table.columns[0].overflow = "fold"  # a long path wraps rather than losing its file name
    for name, result in zip(names, response.results):
        for rank, p in enumerate(result.top, 1):
            table.add_row(name if rank == 1 else "", str(rank), str(p.class_index), p.label, f"{p.probability:.1%}")
    return table


def show_model(info: pb.ModelInfo) -> None:
    """The layer table, the towers, and a line on the served model."""
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
    towers = Table("role", "group", "tower", "device", "host", "node", "parameters")
    for role, listed in (("classify", info.towers), ("training", info.training_towers)):
        for tower in listed:
            towers.add_row(
                role,
                str(tower.replica),
                str(tower.index),
                tower.device,
                tower.host,
                tower.node[:12],
                f"{tower.parameters:,}",
            )
    console.print(towers)
    if info.training_replicas:
        console.print(
            f"the running job trains {info.training_replicas} data-parallel group(s) of "
            f"{len(info.training_towers) // info.training_replicas} towers"
        )
    console.print(
        f"{info.parameters:,} parameters, {len(info.classes)} classes, input {info.image_size}px, "
        f"{info.precision or 'float32'} arithmetic, exchanges over {info.transport}; "
        f"model version {info.model_version} ({info.model_note})"
    )


def colour_lines(figure: pb.KernelsFigure) -> str:
    """Each tower's kernel count and colour specialisation, a line each (0: colour-agnostic, 2/3: random)."""
    pairs = zip(figure.kernels_per_tower, figure.colour_specialisation)
    return "\n".join(f"tower {t} ({n} kernels): colour specialisation {c:.3f}" for t, (n, c) in enumerate(pairs))
