"""The user's side: a Python client for the alexnet-mp gRPC service.

    from client import AlexNetClient
    with AlexNetClient("127.0.0.1:50051") as c:
        job = c.train(builtin=True, preset="demo")
        for event in c.watch(job.job_id): ...
        print(c.classify(["cat.jpg"], top_k=5))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc

DEFAULT_TARGET = os.environ.get("ALEXNET_MP_TARGET", "127.0.0.1:50051")

__all__ = ["AlexNetClient", "DEFAULT_TARGET", "pb"]


def image_message(image) -> pb.Image:
    """A path or encoded bytes become `encoded`; a (3, H, W) float array or tensor becomes `tensor`."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray)):
        return pb.Image(encoded=bytes(image))
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype="<f4")
    return pb.Image(tensor=pb.Tensor(shape=list(array.shape), data=array.tobytes()))


class AlexNetClient:
    def __init__(self, target: str = DEFAULT_TARGET, timeout: Optional[float] = None):
        self.target, self.timeout = target, timeout
        # The channel is made when the client is: create clients after any fork, never before.
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.training = rpc.TrainingServiceStub(self.channel)
        self.inference = rpc.InferenceServiceStub(self.channel)
        self.model = rpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    # --- training ------------------------------------------------------------------------------
    def train(
        self,
        data_dir: Optional[str] = None,
        *,
        builtin: bool = False,
        val_dir: str = "",
        class_names_file: str = "",
        preset: str = "demo",
        overrides: Optional[dict] = None,
        checkpoint_dir: str = "",
        resume_from: str = "",
    ) -> pb.TrainingJob:
        """Start a job; with resume_from (a checkpoint file or folder, or a job id) go on with that run,
        on its recipe (preset must then be empty) and, unless one is given here, its dataset."""
        spec = pb.TrainingSpec(
            val_dir=str(val_dir or ""),
            class_names_file=str(class_names_file or ""),
            preset="" if resume_from and preset == "demo" else preset,
            overrides={k: str(v) for k, v in (overrides or {}).items()},
            checkpoint_dir=str(checkpoint_dir or ""),
            resume_from=str(resume_from or ""),
        )
        if builtin:
            spec.builtin.SetInParent()
        elif data_dir:
            spec.data_dir = str(data_dir)
        return self.training.StartTraining(spec, timeout=self.timeout)

    def watch(self, job_id: str) -> Iterator[pb.TrainingEvent]:
        return self.training.WatchTraining(pb.JobRef(job_id=job_id))

    def get(self, job_id: str) -> pb.TrainingJob:
        return self.training.GetTraining(pb.JobRef(job_id=job_id), timeout=self.timeout)

    def stop(self, job_id: str) -> pb.TrainingJob:
        return self.training.StopTraining(pb.JobRef(job_id=job_id), timeout=self.timeout)

    def list(self) -> list[pb.TrainingJob]:
        return list(self.training.ListTrainings(pb.ListTrainingsRequest(), timeout=self.timeout).jobs)

    # --- classification and the model ---------------------------------------------------------
    def classify(self, images: Iterable, top_k: int = 5) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(images=[image_message(i) for i in images], top_k=top_k)
        return self.inference.Classify(request, timeout=self.timeout)

    def info(self) -> pb.ModelInfo:
        return self.model.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server reports SERVING (its towers are up)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SERVING answer from {self.target} within {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
