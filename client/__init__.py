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
TOKEN_ENV, TOKEN_FILE_ENV = "ALEXNET_MP_TOKEN", "ALEXNET_MP_TOKEN_FILE"


def read_token(token_file: Optional[str] = None) -> Optional[str]:
    """The bearer token: from token_file (its first line, any 'read:'/'train:' prefix dropped), else
    $ALEXNET_MP_TOKEN_FILE, else $ALEXNET_MP_TOKEN; None if none is set."""
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        lines = [line.strip() for line in Path(token_file).read_text().splitlines() if line.strip()]
        token = lines[0] if lines else ""
        for role in ("read:", "train:"):
            token = token.removeprefix(role)
        return token or None
    return os.environ.get(TOKEN_ENV) or None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (on plaintext loopback channels too, where
    gRPC's own call credentials are not allowed)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


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
    """A connection to one server. `token`: a bearer token (default: read_token()). With `tls_ca`
    (PEM) the channel speaks TLS and trusts that CA; `tls_cert` and `tls_key` add a client
    certificate, for servers that ask for one (mutual TLS)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: Optional[float] = None,
        *,
        token: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        self.target, self.timeout = target, timeout
        options = [("grpc.max_receive_message_length", 64 << 20)]
        # The channel is made when the client is: create clients after any fork, never before.
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        token = token if token is not None else read_token()
        if token:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
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
        log_dir: str = "",
        init_from: str = "",
    ) -> pb.TrainingJob:
        """Start a job; with resume_from (a checkpoint file or folder, or a job id) go on with that run,
        on its recipe (preset must then be empty) and, unless one is given here, its dataset.
        log_dir: its TensorBoard folder (default: one of its own under the server's log root).
        init_from: weights to start from (fine-tuning): a checkpoint or safetensors file, a job id, or "version:N"."""
        spec = pb.TrainingSpec(
            val_dir=str(val_dir or ""),
            class_names_file=str(class_names_file or ""),
            preset="" if resume_from and preset == "demo" else preset,
            overrides={k: str(v) for k, v in (overrides or {}).items()},
            checkpoint_dir=str(checkpoint_dir or ""),
            resume_from=str(resume_from or ""),
            log_dir=str(log_dir or ""),
            init_from=str(init_from or ""),
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

    def kernels(self, job_id: Optional[str] = None, version: Optional[int] = None) -> pb.KernelsFigure:
        """The paper's Figure 3 (conv1's kernels per tower, a PNG): of a job's latest checkpoint, of
        a model version, or (neither given) of the version served now."""
        request = pb.GetKernelsRequest()
        if job_id is not None:
            request.job_id = job_id
        elif version is not None:
            request.model_version = version
        return self.model.GetKernels(request, timeout=self.timeout)

    def export(
        self, path, fmt: str = "onnx", job_id: Optional[str] = None, version: Optional[int] = None
    ) -> pb.ExportChunk:
        """Write the model to `path` in that format ("onnx", "torch-export", "safetensors"): of a job's
        latest checkpoint, a model version, or (neither given) the version served now. Needs a train
        token. Returns the last chunk (file name, size, source); the file appears whole or not at all."""
        formats = {"onnx": pb.ONNX, "torch-export": pb.TORCH_EXPORT, "safetensors": pb.SAFETENSORS}
        if fmt not in formats:
            raise ValueError(f"format must be one of {', '.join(formats)}, got {fmt!r}")
        request = pb.ExportRequest(format=formats[fmt])
        if job_id is not None:
            request.job_id = job_id
        elif version is not None:
            request.model_version = version
        path, last, written = Path(path), None, 0
        partial = path.with_name(path.name + ".part")
        try:
            with open(partial, "wb") as out:
                for last in self.model.ExportModel(request, timeout=self.timeout):
                    written += out.write(last.data)
            if last is None or written != last.total_bytes:
                raise IOError(f"the export ended after {written} bytes of {last.total_bytes if last else '?'}")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return last

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
