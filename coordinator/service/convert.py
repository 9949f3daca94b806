"""Proto <-> domain: the API's messages in, the service's objects out, and back.

alexnet.v1's messages: only this module and servicers.py know its generated classes (kserve.py
converts the Open Inference Protocol's itself); jobs, serving and the rest of the service deal in
their own types.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from alexnet_api.v1 import alexnet_pb2 as pb
from coordinator.service.errors import InvalidRequest
from coordinator.service.figures import KernelsFigure
from coordinator.service.job import JobEvent, JobState, JobStatus
from coordinator.service.protocol import decoded_item, tensor_item, tensor_shape_fits
from coordinator.service.requests import TrainingRequest
from coordinator.service.versions import ModelVersion, Prediction
from coordinator.training import Progress

STATES = {state: pb.JobState.Value(state.name) for state in JobState}
EXPORT_FORMATS = {pb.ONNX: "onnx", pb.TORCH_EXPORT: "torch-export", pb.SAFETENSORS: "safetensors"}
EVENT_KINDS = {
    "state": pb.TrainingEvent.STATE,
    "step": pb.TrainingEvent.STEP,
    "epoch": pb.TrainingEvent.EPOCH,
    "published": pb.TrainingEvent.PUBLISHED,
    "recovered": pb.TrainingEvent.RECOVERED,
}


# --- training ------------------------------------------------------------------------------------
def training_request(spec: pb.TrainingSpec) -> TrainingRequest:
    return TrainingRequest(
        builtin=spec.WhichOneof("dataset") == "builtin",
        data_dir=spec.data_dir,
        val_dir=spec.val_dir,
        class_names_file=spec.class_names_file,
        preset=spec.preset,
        overrides=dict(spec.overrides),
        checkpoint_dir=spec.checkpoint_dir,
        resume_from=spec.resume_from,
        log_dir=spec.log_dir,
        init_from=spec.init_from,
    )


def training_spec(request: TrainingRequest) -> pb.TrainingSpec:
    spec = pb.TrainingSpec(
        val_dir=request.val_dir,
        class_names_file=request.class_names_file,
        preset=request.preset,
        overrides=request.overrides,
        checkpoint_dir=request.checkpoint_dir,
        resume_from=request.resume_from,
        log_dir=request.log_dir,
        init_from=request.init_from,
    )
    if request.builtin:
        spec.builtin.SetInParent()
    elif request.data_dir:
        spec.data_dir = request.data_dir
    return spec


def progress(event: Optional[Progress], top1: float, top5: float) -> pb.Progress:
    """The latest progress, with the last validation's accuracy (step events carry none)."""
    if event is None:
        return pb.Progress(top1_accuracy=top1, top5_accuracy=top5, loss=math.nan)
    return pb.Progress(
        step=event.step,
        epoch=event.epoch,
        epochs=event.epochs,
        steps_per_epoch=event.steps_per_epoch,
        loss=event.loss,
        top1_accuracy=top1,
        top5_accuracy=top5,
        images_per_second=event.images_per_second,
        learning_rate=event.lr,
        skipped_images=event.skipped,
        elapsed_seconds=event.elapsed,
    )


def training_job(status: JobStatus) -> pb.TrainingJob:
    return pb.TrainingJob(
        job_id=status.job_id,
        state=STATES[status.state],
        spec=training_spec(status.request),
        progress=progress(status.progress, status.top1, status.top5),
        error=status.error,
        model_version=status.model_version,
        created_unix=status.created,
        ended_unix=status.ended,
        restarts=status.progress.restarts if status.progress else 0,
        checkpoint=status.checkpoint,
        log_dir=status.log_dir,
    )


def training_event(job_id: str, event: JobEvent) -> pb.TrainingEvent:
    return pb.TrainingEvent(
        job_id=job_id,
        kind=EVENT_KINDS[event.kind],
        state=STATES[event.state],
        progress=progress(event.progress, event.top1, event.top5),
        model_version=event.model_version,
        message=event.message,
    )


# --- classification --------------------------------------------------------------------------------
def classify_items(images, image_size: int) -> list:
    """Request images -> the batcher's items, with errors that say which image and why; tensors
    must be [3, image_size, image_size] (protocol.served_size)."""
    if not images:
        raise InvalidRequest("no images: add at least one to `images`")
    items = []
    for i, image in enumerate(images):
        kind = image.WhichOneof("data")
        if kind == "encoded" and not image.encoded:
            raise InvalidRequest(f"image {i}: encoded holds no bytes; send the file's bytes (JPEG, PNG, BMP or WebP)")
        if kind == "encoded":
            items.append(decoded_item(i, image.encoded))
        elif kind == "tensor":
            shape, expected = list(image.tensor.shape), [3, image_size, image_size]
            if not tensor_shape_fits(shape, image_size, batched=False):
                raise InvalidRequest(f"image {i}: tensor shape is {shape}, it must be {expected}")
            count = 3 * image_size * image_size
            if len(image.tensor.data) != 4 * count:
                raise InvalidRequest(
                    f"image {i}: tensor data holds {len(image.tensor.data)} bytes, {shape} float32 needs {4 * count}"
                )
            values = torch.from_numpy(np.frombuffer(image.tensor.data, dtype="<f4").astype(np.float32)).reshape(
                expected
            )
            items.append(tensor_item(i, values))
        else:
            raise InvalidRequest(f"image {i} is empty: set `encoded` or `tensor`")
    return items


def classify_response(top: list[list[Prediction]], version: ModelVersion) -> pb.ClassifyResponse:
    results = [
        pb.Classification(
            top=[pb.Prediction(class_index=p.class_index, label=p.label, probability=p.probability) for p in row]
        )
        for row in top
    ]
    return pb.ClassifyResponse(results=results, model_version=version.version, model_note=version.note)


# --- the model ---------------------------------------------------------------------------------
def tower_infos(towers: list[dict], per_group: int) -> list[pb.TowerInfo]:
    """An engine's towers (ModelParallelAlexNet.tower_info, group-major) as TowerInfo messages."""
    return [
        pb.TowerInfo(
            index=t["tower"],
            device=t["device"],
            host=t["host"],
            parameters=t["parameters"],
            replica=i // per_group,
            node=t.get("node", ""),
        )
        for i, t in enumerate(towers)
    ]


def model_info(engine, version: ModelVersion, training: Optional[tuple[list[dict], int]] = None) -> pb.ModelInfo:
    """The served model; with `training` (the running job's towers and replica groups), those too."""
    config = engine.config
    layers = [
        pb.LayerInfo(
            name=s.name,
            kind=s.layer.kind,
            outputs=s.out_total,
            outputs_per_tower=list(s.out_split),
            sees=s.layer.sees,
            kernel=s.layer.kernel,
            stride=s.layer.stride,
            pad=s.layer.pad,
            then=[_describe(op) for op in s.layer.then],
            parameters=s.parameter_count,
        )
        for s in config.shapes
    ]
    training_towers, replicas = training or ([], 0)
    return pb.ModelInfo(
        layers=layers,
        towers=tower_infos(engine.tower_info, config.towers),
        training_towers=tower_infos(training_towers, config.towers),
        training_replicas=replicas,
        classes=version.labels,
        model_version=version.version,
        parameters=config.parameter_count(),
        model_note=version.note,
        image_size=config.image_size,
        transport=engine.transport,
        precision=engine.precision
        if engine.precision == "float32"
        else f"{engine.precision} ({engine.tower_info[0]['bf16']})",
    )


def _describe(op) -> str:
    fields = dataclasses.asdict(op)
    name = type(op).__name__
    return f"{name}({', '.join(f'{k}={v}' for k, v in fields.items())})" if fields else name


def kernels_figure(figure: KernelsFigure) -> pb.KernelsFigure:
    return pb.KernelsFigure(**dataclasses.asdict(figure))  # the same fields, by name
