"""The gRPC servicers: each RPC converts its request (convert.py), asks the domain, converts back.

`answer` is the one place where what went wrong becomes a gRPC status: a ServiceError by its
kind, anything else INTERNAL with the cause (and the traceback in the log).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import grpc

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc
from coordinator.data import CROP
from coordinator.service import convert, exports, figures, models
from coordinator.service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from coordinator.service.jobs import JobManager
from coordinator.service.metrics import ALEXNET_V1, Metrics
from coordinator.service.serving import Classifier
from coordinator.service.state import StateStore
from coordinator.training.checkpoints import shown

log = logging.getLogger(__name__)

STATUS_CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


MAX_MESSAGE = 1000  # characters of a status message: it travels in metadata, and may quote the request


def status_of(exc: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error met while doing `what`."""
    if isinstance(exc, ServiceError):
        return STATUS_CODES[type(exc)], shown(str(exc), MAX_MESSAGE)
    log.exception("%s failed", what)
    return grpc.StatusCode.INTERNAL, shown(f"{what} failed: {type(exc).__name__}: {exc}", MAX_MESSAGE)


def deadline_of(context) -> Optional[float]:
    """Seconds left before the client's deadline; None when it set none (gRPC then gives a huge number)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 10**6 else None


def answer(context, what: str, work: Callable, on_code: Optional[Callable[[grpc.StatusCode], None]] = None):
    """Do one RPC's work and return its result, or abort the call with the status of what went wrong."""
    code = grpc.StatusCode.OK
    try:
        return work()
    except Exception as exc:
        code, message = status_of(exc, what)
        context.abort(code, message)
    finally:
        if on_code is not None:
            on_code(code)


class TrainingServicer(rpc.TrainingServiceServicer):
    def __init__(self, jobs: JobManager, max_watchers: int = 16):
        self.jobs = jobs
        # Each watch holds a handler thread while it lasts: a cap keeps threads for the other RPCs.
        self.max_watchers, self._watchers = max_watchers, threading.BoundedSemaphore(max_watchers)

    def StartTraining(self, request, context):
        return answer(
            context, "starting training", lambda: self._status(self.jobs.start(convert.training_request(request)))
        )

    def GetTraining(self, request, context):
        return answer(context, "reading the job", lambda: self._status(self.jobs.get(request.job_id)))

    def StopTraining(self, request, context):
        def stop():
            job = self.jobs.get(request.job_id)
            job.request_stop()
            return self._status(job)

        return answer(context, "stopping the job", stop)

    def ListTrainings(self, request, context):
        return answer(
            context, "listing jobs", lambda: pb.ListTrainingsResponse(jobs=[self._status(j) for j in self.jobs.list()])
        )

    def WatchTraining(self, request, context):
        job = answer(context, "watching the job", lambda: self.jobs.get(request.job_id))
        if not self._watchers.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} watch streams are open, the most this server allows: close one, "
                "or poll GetTraining instead",
            )
        try:
            for event in job.watch(context.is_active):  # gRPC's flow control bounds what waits for a slow reader
                yield convert.training_event(job.id, event)
        finally:
            self._watchers.release()

    @staticmethod
    def _status(job) -> pb.TrainingJob:
        return convert.training_job(job.status())


class InferenceServicer(rpc.InferenceServiceServicer):
    def __init__(self, classifier: Classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics

    def Classify(self, request, context):
        start = time.perf_counter()

        def classify():
            self.classifier.check_room(len(request.images))  # a full queue refuses before any decoding
            items = convert.classify_items(request.images, CROP)
            answer = self.classifier.classify(items, request.top_k, deadline_of(context), context.is_active)
            return convert.classify_response(*answer)

        observe = lambda code: self.metrics.observe_classify(ALEXNET_V1, code, time.perf_counter() - start)  # noqa: E731
        return answer(context, "classification", classify, on_code=observe)


class ModelServicer(rpc.ModelServiceServicer):
    def __init__(
        self,
        classifier: Classifier,
        jobs: JobManager,
        store: Optional[StateStore] = None,
        exporter: Optional[exports.Exporter] = None,
    ):
        self.classifier, self.jobs, self.store = classifier, jobs, store
        self.exporter = exporter or exports.Exporter()

    def GetModelInfo(self, request, context):
        describe = lambda: convert.model_info(*self.classifier.serving(), self.jobs.training_towers())  # noqa: E731
        return answer(context, "describing the model", describe)

    def GetKernels(self, request, context):
        draw = lambda: convert.kernels_figure(figures.drawn(self._named(request)))  # noqa: E731
        return answer(context, "drawing the kernels", draw)

    def ExportModel(self, request, context):
        answer(context, "exporting the model", self.exporter.acquire)
        try:
            model, kind = answer(context, "exporting the model", lambda: self._to_export(request))
            data = answer(context, "exporting the model", lambda: exports.file_bytes(model, kind))
            name = exports.file_name(model, kind)
            for piece in exports.chunks(data):
                yield pb.ExportChunk(data=piece, total_bytes=len(data), file_name=name, source=model.source)
        finally:
            self.exporter.release()

    def _to_export(self, request) -> tuple[models.NamedModel, str]:
        kind = convert.EXPORT_FORMATS.get(request.format)
        if kind is None:
            raise InvalidRequest("format must be ONNX, TORCH_EXPORT or SAFETENSORS")
        return self._named(request), kind

    def _named(self, request) -> models.NamedModel:
        """The model a request's `source` names: a job's latest checkpoint, a model version, or the served one."""
        if request.WhichOneof("source") == "job_id":
            status = self.jobs.get(request.job_id).status()
            return models.of_checkpoint(status.job_id, status.checkpoint)
        number = request.model_version if request.HasField("model_version") else None
        return models.served_or_kept(self.classifier.serving, self.store, number)


class ParseRequests(grpc.ServerInterceptor):
    """Decodes each request inside the call, so that bytes that are not the method's message (or
    hold invalid UTF-8 in a string) get INVALID_ARGUMENT, not the INTERNAL that grpcio answers when
    its own decoding fails before any handler runs."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or not (handler.unary_unary or handler.unary_stream):
            return handler  # unknown methods (UNIMPLEMENTED), and reflection's stream, pass through
        decode, method = handler.request_deserializer, handler_call_details.method.rsplit("/", 1)[-1]

        def parsed(raw, context):
            try:
                return decode(raw)
            except Exception as exc:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {method} message ({type(exc).__name__}): send the "
                    "message the API's proto defines",
                )

        if handler.unary_unary:
            run = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda raw, context: run(parsed(raw, context), context), response_serializer=handler.response_serializer
            )

        def stream(raw, context):
            yield from handler.unary_stream(parsed(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
