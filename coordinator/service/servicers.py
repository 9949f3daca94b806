"""alexnet.v1's servicers: each RPC converts its request (convert.py), asks the domain, converts back.

A sibling of kserve.py (the Open Inference Protocol): what both need, from the deadline to the
one mapping of errors to gRPC statuses (`answer`), is in protocol.py.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import grpc

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc
from coordinator.service import convert, exports, figures, models
from coordinator.service.errors import InvalidRequest
from coordinator.service.jobs import JobManager
from coordinator.service.metrics import ALEXNET_V1, Metrics
from coordinator.service.protocol import answer, deadline_of, served_size
from coordinator.service.serving import Classifier
from coordinator.service.state import StateStore


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
            self.classifier.check_room(len(request.images))  # too many, or a full queue: refused before decoding
            items = convert.classify_items(request.images, served_size(self.classifier))
            top = self.classifier.classify(items, request.top_k, deadline_of(context), context.is_active)
            return convert.classify_response(*top)

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
