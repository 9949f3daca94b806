"""The gRPC servicers: each RPC converts its request (convert.py), asks the domain, converts back.

`answer` is the one place where what went wrong becomes a gRPC status: a ServiceError by its
kind, anything else INTERNAL with the cause (and the traceback in the log).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import grpc

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc
from coordinator.data import CROP
from coordinator.service import convert
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed, ServiceError, Unavailable
from coordinator.service.jobs import JobManager
from coordinator.service.metrics import Metrics
from coordinator.service.serving import Classifier

log = logging.getLogger(__name__)

STATUS_CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error met while doing `what`."""
    if isinstance(exc, ServiceError):
        return STATUS_CODES[type(exc)], str(exc)
    log.exception("%s failed", what)
    return grpc.StatusCode.INTERNAL, f"{what} failed: {type(exc).__name__}: {exc}"


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
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    def StartTraining(self, request, context):
        return answer(context, "starting training", lambda: self._status(self.jobs.start(convert.training_request(request))))

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
        for event in job.watch(context.is_active):
            yield convert.training_event(job.id, event)

    @staticmethod
    def _status(job) -> pb.TrainingJob:
        return convert.training_job(job.status())


class InferenceServicer(rpc.InferenceServiceServicer):
    def __init__(self, classifier: Classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics

    def Classify(self, request, context):
        start = time.perf_counter()

        def classify():
            items = convert.classify_items(request.images, CROP)
            return convert.classify_response(*self.classifier.classify(items, request.top_k))

        def observe(code: grpc.StatusCode) -> None:
            self.metrics.classify_requests.labels(code.name).inc()
            self.metrics.classify_latency.observe(time.perf_counter() - start)

        return answer(context, "classification", classify, on_code=observe)


class ModelServicer(rpc.ModelServiceServicer):
    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    def GetModelInfo(self, request, context):
        return answer(context, "describing the model", lambda: convert.model_info(*self.classifier.serving()))
