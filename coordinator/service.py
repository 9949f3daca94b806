"""The gRPC front end: training jobs, dynamically batched classification, model info and metrics.

    server = Server(ServeOptions(port=50051)); server.start(); server.wait()

Two pairs of tower actors run side by side. The training pair belongs to the running job; the
serving pair answers Classify from the latest published model version. Training publishes a
version every `publish_every` steps and at its end; the batcher thread loads it between two
batches, so a classification never waits for a training step and never mixes two versions.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import signal
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc
from coordinator import patterns
from coordinator.data import (
    CROP,
    BadImage,
    ColourStats,
    DatasetError,
    centre_crop,
    check_folder,
    load_image,
    open_dataset,
    to_tensor,
)
from coordinator.engine import ModelParallelAlexNet, ensure_ray
from coordinator.metrics import GrpcMetricsInterceptor, Metrics
from coordinator.training import Progress, recipe, train
from towers import NetConfig

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("TrainingService", "InferenceService", "ModelService")
)
ACTIVE = (pb.PENDING, pb.RUNNING, pb.STOPPING)
MAX_MESSAGE_BYTES = 64 << 20


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see Server.port)
    metrics_port: int = 9464  # 0: any free port; -1: no metrics endpoint
    ray_address: Optional[str] = None  # None: RAY_ADDRESS, else a new local Ray
    max_batch: int = 32  # images per served batch
    max_delay_ms: float = 1.0  # how long a lone request waits for company (batches also form while the towers work)
    width: float = 1.0  # the network served before any training
    data_root: Optional[str] = None  # where the built-in dataset is generated
    threads: int = 32  # gRPC handler threads


@dataclass
class ModelVersion:
    """Weights and everything needed to use them: labels and the input preprocessing."""

    version: int
    state: Optional[dict]  # None: the serving towers' own initial weights
    labels: list[str]
    stats: ColourStats
    normalise: bool
    net: dict  # NetConfig fields

    @property
    def note(self) -> str:
        return "initial weights: not trained yet" if self.version == 0 else f"trained, version {self.version}"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# --- classification ----------------------------------------------------------------------------
@dataclass
class _Request:
    items: list  # ("crop", uint8 HxWx3) or ("tensor", float32 3x227x227)
    enqueued: float = field(default_factory=time.perf_counter)
    done: futures.Future = field(default_factory=futures.Future)


class Classifier:
    """The serving pair of towers behind a dynamic batcher thread."""

    def __init__(self, version: ModelVersion, max_batch: int, max_delay: float, metrics: Metrics):
        self.max_batch, self.max_delay, self.metrics = max_batch, max_delay, metrics
        self.engine = self._serving_engine(version)
        self.current, self._next = version, None
        self._queue: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        metrics.version.set(version.version)
        self._thread = threading.Thread(target=self._loop, name="classify-batcher", daemon=True)
        self._thread.start()

    @staticmethod
    def _serving_engine(version: ModelVersion) -> ModelParallelAlexNet:
        # Dropout only acts in training; "paper" initial weights are what version 0 serves.
        return ModelParallelAlexNet(**version.net, dropout=0.0, init="paper")

    def submit(self, items: list) -> _Request:
        if len(items) > self.max_batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(items)} images in one request; this server batches at most {self.max_batch}: split the request",
            )
        request = _Request(items)
        with self._cv:
            if self._closing:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            self._queue.append(request)
            self.metrics.pending.set(len(self._queue))
            self._cv.notify()
        return request

    def publish(self, version: ModelVersion) -> None:
        with self._cv:
            self._next = version
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for request in self._queue:
            request.done.set_exception(RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down"))
        self.engine.shutdown()

    def _take_batch(self) -> list[_Request]:
        """The oldest requests that fit in one batch, waiting up to max_delay for more to arrive."""
        with self._cv:
            deadline = self._queue[0].enqueued + self.max_delay
            while sum(len(r.items) for r in self._queue) < self.max_batch and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].items) <= self.max_batch:
                size += len(self._queue[0].items)
                batch.append(self._queue.popleft())
            self.metrics.pending.set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and self._next is None and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                version, self._next = self._next, None
            if version is not None:
                self._activate(version)  # between batches: no batch ever sees two versions
            if self._queue:
                batch = self._take_batch()
                if batch:
                    self._run(batch)

    def _activate(self, version: ModelVersion) -> None:
        try:
            if version.net != self.current.net:
                # Another shape of network (other classes, another width): a new pair of towers.
                old, self.engine = self.engine, self._serving_engine(version)
                old.shutdown()
            if version.state is not None:
                self.engine.load_state_dict(version.state)
            self.current = version
            self.metrics.version.set(version.version)
        except Exception:
            log.exception("could not load model version %d; still serving version %d", version.version, self.current.version)

    def _run(self, batch: list[_Request]) -> None:
        version, started = self.current, time.perf_counter()
        try:
            inputs = []
            for request in batch:
                self.metrics.queue_seconds.observe(started - request.enqueued)
                for kind, value in request.items:
                    if kind == "crop":
                        inputs.append(to_tensor(value[None], np.zeros((1, 3)), version.stats, version.normalise)[0])
                    else:
                        inputs.append(value)
            self.metrics.batch_size.observe(len(inputs))
            probs = self.engine.predict(torch.stack(inputs)).softmax(dim=1)
        except Exception as exc:
            for request in batch:
                request.done.set_exception(exc)
            return
        offset = 0
        for request in batch:
            n = len(request.items)
            request.done.set_result((probs[offset : offset + n], version))
            offset += n


def decode_items(images, image_size: int) -> list:
    """Request images -> batcher items, with INVALID_ARGUMENT errors that say which image and why."""
    if not images:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no images: add at least one to `images`")
    items = []
    for i, image in enumerate(images):
        kind = image.WhichOneof("data")
        if kind == "encoded":
            try:
                items.append(("crop", centre_crop(load_image(io.BytesIO(image.encoded)))))
            except BadImage as exc:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image {i} cannot be decoded ({exc}); send JPEG, PNG, BMP or WebP bytes",
                ) from None
        elif kind == "tensor":
            shape = list(image.tensor.shape)
            expected = [3, image_size, image_size]
            if shape != expected:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"image {i}: tensor shape is {shape}, it must be {expected}"
                )
            count = 3 * image_size * image_size
            if len(image.tensor.data) != 4 * count:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image {i}: tensor data holds {len(image.tensor.data)} bytes, {shape} float32 needs {4 * count}",
                )
            values = torch.from_numpy(np.frombuffer(image.tensor.data, dtype="<f4").astype(np.float32)).reshape(expected)
            if not torch.isfinite(values).all():
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"image {i}: tensor holds NaN or infinite values")
            items.append(("tensor", values))
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"image {i} is empty: set `encoded` or `tensor`")
    return items


# --- training jobs -----------------------------------------------------------------------------
def progress_proto(event: Optional[Progress]) -> pb.Progress:
    if event is None:
        return pb.Progress(top1_accuracy=math.nan, top5_accuracy=math.nan, loss=math.nan)
    return pb.Progress(
        step=event.step,
        epoch=event.epoch,
        epochs=event.epochs,
        steps_per_epoch=event.steps_per_epoch,
        loss=event.loss,
        top1_accuracy=event.top1,
        top5_accuracy=event.top5,
        images_per_second=event.images_per_second,
        learning_rate=event.lr,
        skipped_images=event.skipped,
        elapsed_seconds=event.elapsed,
    )


class Job:
    """One training job: its state, latest progress, and a bounded log of events for watchers."""

    HISTORY = 4096

    def __init__(self, spec: pb.TrainingSpec):
        self.id = uuid.uuid4().hex[:12]
        self.spec, self.state, self.error = spec, pb.PENDING, ""
        self.progress: Optional[Progress] = None
        self.top1, self.top5 = math.nan, math.nan
        self.model_version, self.created, self.ended = 0, time.time(), 0.0
        self.stop_event = threading.Event()
        self._events: collections.deque = collections.deque(maxlen=self.HISTORY)
        self._seq = 0
        self._cv = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def _progress(self) -> pb.Progress:
        """The latest progress, with the last validation's accuracy (step events carry none)."""
        progress = progress_proto(self.progress)
        progress.top1_accuracy, progress.top5_accuracy = self.top1, self.top5
        return progress

    def proto(self) -> pb.TrainingJob:
        with self._cv:
            return pb.TrainingJob(
                job_id=self.id,
                state=self.state,
                spec=self.spec,
                progress=self._progress(),
                error=self.error,
                model_version=self.model_version,
                created_unix=self.created,
                ended_unix=self.ended,
            )

    def _append(self, kind, message: str = "") -> None:
        """Record an event (caller holds the lock)."""
        event = pb.TrainingEvent(
            job_id=self.id,
            kind=kind,
            state=self.state,
            progress=self._progress(),
            model_version=self.model_version,
            message=message,
        )
        self._seq += 1
        self._events.append((self._seq, event))
        self._cv.notify_all()

    def set_state(self, state, message: str = "", error: str = "") -> None:
        with self._cv:
            if self.state in (pb.FINISHED, pb.STOPPED, pb.FAILED):
                return
            self.state, self.error = state, error or self.error
            if state in (pb.FINISHED, pb.STOPPED, pb.FAILED):
                self.ended = time.time()
            self._append(pb.TrainingEvent.STATE, message)

    def on_progress(self, event: Progress) -> None:
        with self._cv:
            self.progress = event
            if event.kind == "epoch":
                self.top1, self.top5 = event.top1, event.top5
            self._append(pb.TrainingEvent.EPOCH if event.kind == "epoch" else pb.TrainingEvent.STEP)

    def on_published(self, version: int) -> None:
        with self._cv:
            self.model_version = version
            self._append(pb.TrainingEvent.PUBLISHED, f"model version {version} is now served")

    def request_stop(self) -> None:
        self.stop_event.set()
        with self._cv:
            if self.state in (pb.PENDING, pb.RUNNING):
                self.state = pb.STOPPING
                self._append(pb.TrainingEvent.STATE, "stopping at the next step boundary")

    def watch(self, is_active=lambda: True):
        """The current state first, then live events, until the job ends (or the watcher leaves)."""
        with self._cv:
            last = self._seq
            yield pb.TrainingEvent(
                job_id=self.id,
                kind=pb.TrainingEvent.STATE,
                state=self.state,
                progress=self._progress(),
                model_version=self.model_version,
                message="current state",
            )
            if self.state not in ACTIVE:
                return
        while is_active():
            with self._cv:
                self._cv.wait_for(lambda: self._seq > last, timeout=1.0)
                fresh = [(seq, event) for seq, event in self._events if seq > last]
            for seq, event in fresh:
                last = seq
                yield event
                if event.kind == pb.TrainingEvent.STATE and event.state not in ACTIVE:
                    return


class JobManager:
    def __init__(self, server: "Server"):
        self.server = server
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty: pass the id StartTraining returned")
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no training job {job_id!r}; ListTrainings shows them all")
        return job

    def start(self, spec: pb.TrainingSpec) -> Job:
        self.validate(spec)
        with self._lock:
            running = [job for job in self.jobs.values() if job.state in ACTIVE]
            if running:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {running[0].id} is still {pb.JobState.Name(running[0].state)}: the towers train one job at "
                    "a time; stop it (StopTraining) or wait for it to end",
                )
            job = Job(spec)
            self.jobs[job.id] = job
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"train-{job.id}", daemon=True)
            job.thread.start()
        return job

    @staticmethod
    def validate(spec: pb.TrainingSpec) -> None:
        def invalid(message):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)

        which = spec.WhichOneof("dataset")
        if which is None:
            invalid("no dataset: set data_dir to an ImageFolder training folder, or builtin for the built-in one")
        try:
            if which == "data_dir":
                check_folder(Path(spec.data_dir))
            if spec.val_dir:
                check_folder(Path(spec.val_dir))
        except DatasetError as exc:
            invalid(str(exc))
        if spec.class_names_file and not Path(spec.class_names_file).is_file():
            invalid(f"class_names_file {spec.class_names_file} does not exist")
        try:
            recipe(spec.preset or "demo", dict(spec.overrides))
        except ValueError as exc:
            invalid(str(exc))
        if spec.checkpoint_dir:
            folder = Path(spec.checkpoint_dir)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                invalid(f"checkpoint_dir {folder} is not writable: {exc.strerror or exc}")

    def _run(self, job: Job) -> None:
        spec, server = job.spec, self.server
        try:
            plan = recipe(spec.preset or "demo", dict(spec.overrides))
            if spec.WhichOneof("dataset") == "builtin":
                job.set_state(pb.PENDING, "generating the built-in dataset (first use only)")
                root = patterns.generate(server.data_root)
                train_dir, val_dir, names = root / "train", root / "val", None
            else:
                train_dir, val_dir = Path(spec.data_dir), (Path(spec.val_dir) if spec.val_dir else None)
                names = Path(spec.class_names_file) if spec.class_names_file else None
            job.set_state(pb.PENDING, "reading the dataset and its colour statistics")
            dataset = open_dataset(train_dir, val_dir, val_fraction=plan.val_fraction, class_names=names)
            if job.stop_event.is_set():
                job.set_state(pb.STOPPED, "stopped before training began")
                return
            job.set_state(pb.RUNNING, f"training on {len(dataset.train)} images of {dataset.num_classes} classes")
            net = dict(num_classes=dataset.num_classes, width=plan.width)

            def on_event(event: Progress) -> None:
                if event.kind == "step":
                    server.metrics.observe_step(event, event.batch, event.step_seconds)
                else:
                    server.metrics.observe_validation(event)
                job.on_progress(event)

            def on_publish(step: int, state: dict) -> None:
                version = server.publish(
                    ModelVersion(0, state, dataset.labels, dataset.stats, plan.normalise, net)
                )
                job.on_published(version)

            result = train(
                dataset,
                spec.preset or "demo",
                dict(spec.overrides),
                on_event=on_event,
                stop=job.stop_event,
                on_publish=on_publish,
                on_stats=server.metrics.observe_engine,
                checkpoint_dir=spec.checkpoint_dir or None,
            )
            final = pb.STOPPED if result.state == "stopped" else pb.FINISHED
            job.set_state(final, f"{result.state} after {result.steps} steps, top-1 {result.top1:.1%}")
        except Exception as exc:  # the job fails; the server and its other jobs carry on
            log.exception("training job %s failed", job.id)
            job.set_state(pb.FAILED, "failed", error=f"{type(exc).__name__}: {exc}")

    def stop_all(self, timeout: float = 60) -> None:
        for job in list(self.jobs.values()):
            job.request_stop()
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout)


# --- gRPC servicers ----------------------------------------------------------------------------
def _handle(context, fn):
    try:
        return fn()
    except RequestError as exc:
        context.abort(exc.code, str(exc))


class TrainingServicer(rpc.TrainingServiceServicer):
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    def StartTraining(self, request, context):
        return _handle(context, lambda: self.jobs.start(request).proto())

    def GetTraining(self, request, context):
        return _handle(context, lambda: self.jobs.get(request.job_id).proto())

    def StopTraining(self, request, context):
        def stop():
            job = self.jobs.get(request.job_id)
            job.request_stop()
            return job.proto()

        return _handle(context, stop)

    def ListTrainings(self, request, context):
        jobs = sorted(self.jobs.jobs.values(), key=lambda j: j.created, reverse=True)
        return pb.ListTrainingsResponse(jobs=[job.proto() for job in jobs])

    def WatchTraining(self, request, context):
        job = _handle(context, lambda: self.jobs.get(request.job_id))
        yield from job.watch(context.is_active)


class InferenceServicer(rpc.InferenceServiceServicer):
    def __init__(self, server: "Server"):
        self.server = server

    def Classify(self, request, context):
        metrics, start = self.server.metrics, time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            classifier = self.server.classifier
            if classifier is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the serving towers are still starting; retry shortly")
            classes, top_k = len(classifier.current.labels), request.top_k
            if not 1 <= top_k <= classes:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be between 1 and {classes} (the classes), got {top_k}"
                )
            items = decode_items(request.images, CROP)
            probs, version = classifier.submit(items).done.result()
            top_k = min(top_k, len(version.labels))
            values, indices = probs.topk(top_k, dim=1)
            results = [
                pb.Classification(
                    top=[
                        pb.Prediction(class_index=int(i), label=version.labels[int(i)], probability=float(p))
                        for p, i in zip(row_p, row_i)
                    ]
                )
                for row_p, row_i in zip(values, indices)
            ]
            return pb.ClassifyResponse(results=results, model_version=version.version, model_note=version.note)
        except RequestError as exc:
            code = exc.code
            context.abort(exc.code, str(exc))
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("classification failed")
            context.abort(grpc.StatusCode.INTERNAL, f"classification failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.classify_requests.labels(code.name).inc()
            metrics.classify_latency.observe(time.perf_counter() - start)


class ModelServicer(rpc.ModelServiceServicer):
    def __init__(self, server: "Server"):
        self.server = server

    def GetModelInfo(self, request, context):
        classifier = self.server.classifier
        if classifier is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the serving towers are still starting; retry shortly")
        engine, version = classifier.engine, classifier.current
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
            for s in engine.config.shapes
        ]
        towers = [
            pb.TowerInfo(index=t["tower"], device=t["device"], host=t["host"], parameters=t["parameters"])
            for t in engine.towers
        ]
        return pb.ModelInfo(
            layers=layers,
            towers=towers,
            classes=version.labels,
            model_version=version.version,
            parameters=engine.config.parameter_count(),
            model_note=version.note,
            image_size=engine.config.image_size,
        )


def _describe(op) -> str:
    fields = dataclasses.asdict(op)
    name = type(op).__name__
    return f"{name}({', '.join(f'{k}={v}' for k, v in fields.items())})" if fields else name


# --- the server --------------------------------------------------------------------------------
class Server:
    def __init__(self, options: ServeOptions = ServeOptions()):
        self.options = options
        self.metrics = Metrics()
        self.jobs = JobManager(self)
        self.classifier: Optional[Classifier] = None
        self.data_root = Path(options.data_root) if options.data_root else patterns.default_root()
        self._version_lock = threading.Lock()
        self._last_version = 0
        self._grpc: Optional[grpc.Server] = None
        self._http = None
        self.port = self.metrics_port = None
        self.health = health.HealthServicer()

    def publish(self, version: ModelVersion) -> int:
        """Number a new model version and hand it to the serving towers; returns its number."""
        with self._version_lock:
            self._last_version += 1
            version.version = self._last_version
        if self.classifier is not None:
            self.classifier.publish(version)
        return version.version

    def start(self) -> "Server":
        opts = self.options
        ensure_ray(opts.ray_address)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # The gRPC server is made here, after Ray has started its processes: nothing forks after this.
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="grpc"),
            interceptors=[GrpcMetricsInterceptor(self.metrics)],
            # A full batch of raw tensors is 32 x 618 KB; gRPC's default cap is 4 MiB.
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        rpc.add_TrainingServiceServicer_to_server(TrainingServicer(self.jobs), self._grpc)
        rpc.add_InferenceServiceServicer_to_server(InferenceServicer(self), self._grpc)
        rpc.add_ModelServiceServicer_to_server(ModelServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        try:
            self.port = self._grpc.add_insecure_port(f"{opts.host}:{opts.port}")
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {opts.host}:{opts.port} ({exc}); is the port taken? try --port") from None
        self._grpc.start()
        if opts.metrics_port >= 0:
            try:
                self._http = self.metrics.serve_http(opts.host, opts.metrics_port)
            except OSError as exc:
                raise RuntimeError(f"cannot serve metrics on port {opts.metrics_port}: {exc}; try --metrics-port") from None
            self.metrics_port = self._http.server_address[1]
        initial = ModelVersion(
            0,
            None,
            list(patterns.KINDS.values()),
            ColourStats.imagenet(),
            True,
            dict(num_classes=len(patterns.KINDS), width=opts.width),
        )
        self.metrics.prepare(NetConfig(**initial.net))  # a bad --width fails here, before any actor starts
        self.classifier = Classifier(initial, opts.max_batch, opts.max_delay_ms / 1000.0, self.metrics)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)  # towers are up: now we serve
        log.info("serving gRPC on %s:%d, metrics on :%s", opts.host, self.port, self.metrics_port)
        return self

    def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.jobs.stop_all()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self.classifier is not None:
            self.classifier.close()
        if self._http is not None:
            self._http.shutdown()

    def wait(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly (jobs stop at a step boundary, checkpoints kept)."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()
