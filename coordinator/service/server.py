"""The gRPC server: its options, and the wiring of jobs, serving, servicers, health and metrics.

    server = Server(ServeOptions(port=50051)).start(); server.wait()

Two pairs of tower actors run side by side: the training pair belongs to the running job
(jobs.py), the serving pair answers Classify from the latest published version (serving.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from alexnet_api.v1 import alexnet_pb2 as pb
from alexnet_api.v1 import alexnet_pb2_grpc as rpc
from coordinator.data import ColourStats, patterns
from coordinator.engine import ensure_ray
from coordinator.service import kserve, models
from coordinator.service.errors import ServiceError
from coordinator.service.exports import Exporter
from coordinator.service.jobs import JobManager
from coordinator.service.metrics import GrpcMetricsInterceptor, Metrics
from coordinator.service.protocol import ParseRequests
from coordinator.service.requests import Roots
from coordinator.service.security import (
    OPEN,
    READ,
    TRAIN,
    AuthInterceptor,
    SecurityError,
    TLSFiles,
    check_exposure,
    is_loopback,
    load_tokens,
    token_file_from_env,
)
from coordinator.service.servicers import InferenceServicer, ModelServicer, TrainingServicer
from coordinator.service.serving import Classifier
from coordinator.service.serving_policy import ServingShare
from coordinator.service.state import StateStore
from coordinator.service.versions import ModelVersion
from towers import NetConfig

log = logging.getLogger(__name__)

# Ours, and the Open Inference Protocol's (kserve.py), on the same port.
SERVICE_NAMES = (
    *(
        pb.DESCRIPTOR.services_by_name[name].full_name
        for name in ("TrainingService", "InferenceService", "ModelService")
    ),
    kserve.SERVICE_NAME,
)
MAX_MESSAGE_BYTES = 64 << 20  # a full batch of raw tensors is 32 x 618 KB; gRPC's default cap is 4 MiB


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see Server.port)
    metrics_port: int = 9464  # 0: any free port; -1: no metrics endpoint
    ray_address: Optional[str] = None  # None: RAY_ADDRESS, else a new local Ray
    max_batch: int = 32  # images per served batch
    max_delay_ms: float = 1.0  # how long a lone request waits for company (batches also form while the towers work)
    max_queue: int = 256  # images waiting to be classified, at most; beyond, RESOURCE_EXHAUSTED
    serving_share: float = (
        0.25  # while a job trains, serving computes at most this share of the time (serving.ServingShare)
    )
    serving_nice: int = 0  # the serving towers' CPU priority this far below training's: 0-19
    max_watchers: int = 16  # WatchTraining streams open at once, at most (each holds a handler thread)
    max_exports: int = 2  # ExportModel calls running at once, at most (each holds copies of the weights)
    width: float = 1.0  # the network served before any training
    data_root: Optional[str] = None  # where the built-in dataset is generated
    threads: int = 32  # gRPC handler threads
    transport: str = "auto"  # the serving towers' exchanges (a training job's come from its recipe)
    precision: str = "float32"  # the serving towers' arithmetic (a training job's comes from its recipe)
    state_dir: Optional[str] = None  # where job records and model versions outlive the server (None: nowhere)
    keep_versions: int = 5  # model versions kept in the state dir, besides the pinned ones
    pinned_versions: tuple = ()  # version numbers the state dir keeps whatever their age
    auth_token_file: Optional[str] = None  # tokens and their roles (security.py); None: no authentication
    tls_cert: Optional[str] = None  # PEM files: with both, the port speaks TLS only
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None  # clients must then present a certificate it signed (mutual TLS)
    insecure_no_auth: bool = False  # allow a non-loopback host without tokens (a trusted network only)
    data_roots: Optional[list] = None  # folders requests may train on; None: the user's home on loopback, else none
    checkpoint_roots: Optional[list] = None  # folders requests may write checkpoints to and resume from; likewise
    log_root: Optional[str] = None  # jobs' TensorBoard folders (None: see log_folder)

    def log_folder(self) -> Path:
        """Where jobs write their TensorBoard logs unless a request names a folder: log_root, else
        $ALEXNET_MP_LOGS, else <state_dir>/tensorboard, else the user's cache (~/.cache/alexnet-mp/tensorboard)."""
        given = self.log_root or os.environ.get("ALEXNET_MP_LOGS")
        if given:
            return Path(given)
        return Path(self.state_dir) / "tensorboard" if self.state_dir else patterns.cache_dir() / "tensorboard"

    def roots(self) -> Roots:
        """The path roots, with their safe defaults: on loopback the user's home, elsewhere nothing until given."""
        default = [Path.home()] if is_loopback(self.host) else []
        pick = lambda given: default if given is None else given  # noqa: E731
        return Roots.of(pick(self.data_roots), pick(self.checkpoint_roots))


class Server:
    def __init__(self, options: Optional[ServeOptions] = None):
        self.options = options = options or ServeOptions()
        self.metrics = Metrics()
        self.classifier = Classifier(
            options.max_batch,
            options.max_delay_ms / 1000.0,
            self.metrics,
            options.transport,
            self._serving_changed,
            options.max_queue,
            options.serving_nice,
            options.precision,
            ServingShare(options.serving_share, training=lambda: self.jobs.training()),
        )
        data_root = Path(options.data_root) if options.data_root else patterns.default_root()
        self.store = (
            StateStore(options.state_dir, options.keep_versions, pinned=options.pinned_versions)
            if options.state_dir
            else None
        )
        logs = options.log_folder()
        self.jobs = JobManager(
            self.metrics, self._publish, data_root, logs, self.store, options.roots(), self._weights_of
        )
        self.exporter = Exporter(options.max_exports)
        self.health = health.HealthServicer()
        self.port = self.metrics_port = None
        self.roles: dict[str, str] = {}  # every registered method (/package.Service/Method): the role it needs
        self._grpc: Optional[grpc.Server] = None
        self._http = None

    def start(self) -> "Server":
        opts = self.options
        # The last version published before a restart, else version 0: the initial weights, for the built-in classes.
        initial = (self.store and self.store.latest_version()) or ModelVersion(
            0,
            None,
            list(patterns.KINDS.values()),
            ColourStats.imagenet(),
            True,
            dict(num_classes=len(patterns.KINDS), width=opts.width),
        )
        self.metrics.prepare(NetConfig(**initial.net))  # a bad --width fails here, before anything starts
        interceptors, credentials = self._security()  # and so does an unsafe or broken security setting
        self._check_log_root()  # and a --log-root where the server may not write
        ensure_ray(opts.ray_address)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if opts.metrics_port >= 0:  # its process starts before the gRPC server: nothing forks after that
            try:
                self._http = self.metrics.serve_http(opts.host, opts.metrics_port)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot serve metrics on port {opts.metrics_port}: {exc}; try --metrics-port"
                ) from None
            self.metrics_port = self._http.port
        # The gRPC server is made here, after Ray and the metrics endpoint have started their processes.
        self._grpc = grpc.server(
            self._handler_pool(),
            interceptors=interceptors,
            maximum_concurrent_rpcs=opts.threads
            * 4,  # beyond, gRPC answers RESOURCE_EXHAUSTED: its own queue is bounded
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        self._register()
        address = f"{opts.host}:{opts.port}"
        try:
            if credentials is not None:
                self.port = self._grpc.add_secure_port(address, credentials)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            if self._http is not None:
                self._http.close()
            raise RuntimeError(
                f"cannot listen on {opts.host}:{opts.port} ({exc}); is the port taken? try --port"
            ) from None
        self._grpc.start()
        self.classifier.start(initial)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)  # towers are up: now we serve
        log.info("serving gRPC on %s:%d, metrics on :%s", opts.host, self.port, self.metrics_port)
        return self

    def _register(self) -> None:
        """Add every service, each of its methods with the role a token needs for it (security.py):
        declared here, beside the registration, for every method, with no default."""
        opts, v1 = self.options, pb.DESCRIPTOR.services_by_name
        self._add(
            rpc.add_TrainingServiceServicer_to_server,
            TrainingServicer(self.jobs, opts.max_watchers),
            v1["TrainingService"],
            StartTraining=TRAIN,
            StopTraining=TRAIN,
            GetTraining=READ,
            ListTrainings=READ,
            WatchTraining=READ,
        )
        self._add(
            rpc.add_InferenceServiceServicer_to_server,
            InferenceServicer(self.classifier, self.metrics),
            v1["InferenceService"],
            Classify=READ,
        )
        self._add(
            rpc.add_ModelServiceServicer_to_server,
            ModelServicer(self.classifier, self.jobs, self.store, self.exporter),
            v1["ModelService"],
            GetModelInfo=READ,
            GetKernels=READ,
            ExportModel=TRAIN,
        )  # the weights leave with an export
        self._add(
            kserve.v2_rpc.add_GRPCInferenceServiceServicer_to_server,
            kserve.KServeServicer(self.classifier, self.metrics),
            kserve.SERVICE,
            ServerLive=OPEN,
            ServerReady=OPEN,
            ServerMetadata=READ,
            ModelReady=READ,
            ModelMetadata=READ,
            ModelInfer=READ,
        )  # probes stay open, like health
        self._add(
            health_pb2_grpc.add_HealthServicer_to_server,
            self.health,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            Check=OPEN,
            Watch=OPEN,
            List=OPEN,
        )
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        self._add(
            lambda _, server: reflection.enable_server_reflection(names, server),
            None,
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
            ServerReflectionInfo=OPEN,
        )

    def _add(self, add_to_server, servicer, service, **roles: str) -> None:
        """Register one service, with a role for each of its methods (a method without one stops the server)."""
        missing = [m.name for m in service.methods if m.name not in roles]
        if missing:
            raise RuntimeError(f"no role declared for {service.full_name}: {', '.join(missing)}")
        add_to_server(servicer, self._grpc)
        self.roles.update({f"/{service.full_name}/{m.name}": roles[m.name] for m in service.methods})

    def _handler_pool(self) -> futures.ThreadPoolExecutor:
        """The gRPC handler threads. They stay at the server's priority whatever --serving-nice: one
        lowered and descheduled while it holds the GIL would hold back every thread here, the job's too."""
        return futures.ThreadPoolExecutor(max_workers=self.options.threads, thread_name_prefix="grpc")

    def _security(self) -> tuple[list, Optional[grpc.ServerCredentials]]:
        """The interceptors (metrics first, so refusals count too) and TLS credentials; SecurityError
        for a setting that is unsafe (a network address with no tokens) or incomplete."""
        opts = self.options
        token_file = opts.auth_token_file or token_file_from_env()
        tokens = load_tokens(token_file) if token_file else None
        check_exposure(opts.host, bool(tokens), opts.insecure_no_auth)
        if bool(opts.tls_cert) != bool(opts.tls_key) or (opts.tls_client_ca and not opts.tls_cert):
            raise SecurityError("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
        credentials = (
            TLSFiles(opts.tls_cert, opts.tls_key, opts.tls_client_ca).server_credentials() if opts.tls_cert else None
        )
        if tokens and credentials is None and not is_loopback(opts.host):
            log.warning("tokens will cross the network in clear text: add --tls-cert and --tls-key")
        interceptors = [GrpcMetricsInterceptor(self.metrics)]
        if tokens:
            interceptors.append(AuthInterceptor(tokens, self.roles))  # filled in as the services are registered
        return [*interceptors, ParseRequests()], credentials

    def _check_log_root(self) -> None:
        """A --log-root must lie under the checkpoint roots: they say where this server may write."""
        if self.options.log_root:
            try:
                self.options.roots().check("--log-root", self.options.log_root, "checkpoints")
            except ServiceError as exc:
                raise SecurityError(str(exc)) from None

    def _weights_of(self, number: int) -> tuple[dict, str]:
        """A model version's weights and what it is, for init_from version:N."""
        model = models.served_or_kept(self.classifier.serving, self.store, number)
        return model.weights(None), model.source

    def _publish(self, version: ModelVersion) -> int:
        """Serve a new version (numbered here) and, with a state dir, keep it for after a restart."""
        number = self.classifier.publish(version)
        if self.store is not None:
            self.store.save_version(version)
        return number

    def _serving_changed(self, serving: bool) -> None:
        """The classifier lost its serving towers (False) or has them again (True)."""
        self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.jobs.stop_all()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        self.classifier.close()
        if self._http is not None:
            self._http.close()

    def wait(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly (jobs stop at a step boundary, checkpoints kept)."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()
