"""Prometheus metrics for the service: training, towers, exchanges, serving, model version, gRPC.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` for counters. Every
metric lives in the service's own registry, so two servers in one process never collide.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.service.metrics_endpoint import HEADER

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The classification metrics' protocol label: Classify, and the Open Inference Protocol's ModelInfer.
ALEXNET_V1, KSERVE_V2 = "alexnet.v1", "kserve.v2"


class Metrics:
    """Every metric of the service, by family; observed where the event happens (job_metrics.py for
    a training job's, serving.py and the protocol adapters for classification's)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._training(self.registry)
        self._towers(self.registry)
        self._serving(self.registry)
        self._recovery(self.registry)
        self._grpc(self.registry)

    def _training(self, r: CollectorRegistry) -> None:
        self.steps = Counter("alexnet_training_steps_total", "SGD steps taken", registry=r)
        self.samples = Counter("alexnet_training_samples_total", "Images trained on", registry=r)
        self.loss = Gauge("alexnet_training_loss", "Loss of the last step", registry=r)
        self.top1 = Gauge("alexnet_validation_top1_accuracy", "Top-1 accuracy of the last validation", registry=r)
        self.top5 = Gauge("alexnet_validation_top5_accuracy", "Top-5 accuracy of the last validation", registry=r)
        self.lr = Gauge("alexnet_training_learning_rate", "Current learning rate", registry=r)
        self.epoch = Gauge("alexnet_training_epoch", "Epochs completed in the current job", registry=r)
        self.images_per_second = Gauge("alexnet_training_images_per_second", "Training throughput", registry=r)
        self.colour_specialisation = Gauge(
            "alexnet_conv1_colour_specialisation",
            "Share of the tower's conv1 kernel energy off the grey axis, at the last validation: 0 colour-agnostic, "
            "2/3 random, 1 purely chromatic (towers/figures.py)",
            ["tower"],
            registry=r,
        )
        self.skipped = Gauge(
            "alexnet_training_skipped_images", "Unreadable images skipped in the current job", registry=r
        )
        # 1 from the moment a job trains until its thread ends: the stalled-training alert needs it
        self.running = Gauge("alexnet_training_running", "1 while a job is RUNNING (or stopping), else 0", registry=r)
        self.step_seconds = Histogram(
            "alexnet_training_step_duration_seconds", "Wall time of one training step", buckets=STEP_BUCKETS, registry=r
        )

    def _towers(self, r: CollectorRegistry) -> None:
        """The towers and the exchanges between them."""
        self.tower_compute = Counter(
            "alexnet_tower_compute_seconds_total",
            "Seconds each tower computed, per stage and direction (replica: its data-parallel group)",
            ["replica", "tower", "stage", "direction"],
            registry=r,
        )
        self.allreduce_seconds = Counter(
            "alexnet_allreduce_seconds_total",
            "Seconds each tower spent averaging its gradients with its replicas",
            ["replica", "tower"],
            registry=r,
        )
        self.allreduce_bytes = Counter(
            "alexnet_allreduce_bytes_total",
            "Bytes of gradients each tower all-reduced with its replicas",
            ["replica", "tower"],
            registry=r,
        )
        self.exchange_seconds = Histogram(
            "alexnet_exchange_duration_seconds",
            "Per step, the longest any tower waited for an exchange's data",
            ["point", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exchange_bytes = Counter(
            "alexnet_exchange_bytes_total", "Bytes moved between towers", ["point", "direction"], registry=r
        )

    def _serving(self, r: CollectorRegistry) -> None:
        self.classify_requests = Counter(
            "alexnet_classify_requests_total",
            "Classification requests by protocol and gRPC code",
            ["protocol", "code"],
            registry=r,
        )
        self.classify_latency = Histogram(
            "alexnet_classify_latency_seconds",
            "Classification request latency, by protocol",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "alexnet_classify_queue_seconds",
            "Time a request waited to join a batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "alexnet_classify_batch_size", "Images per served batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.pending = Gauge("alexnet_classify_pending_requests", "Requests waiting for a batch", registry=r)
        # The queue is bounded in images, not requests: the queue-near-full alert divides these two
        self.pending_images = Gauge("alexnet_classify_pending_images", "Images waiting for a batch", registry=r)
        self.queue_capacity = Gauge(
            "alexnet_classify_queue_capacity_images", "Images the queue holds at most (--max-queue)", registry=r
        )
        self.version = Gauge("alexnet_model_version", "The model version being served", registry=r)

    def _recovery(self, r: CollectorRegistry) -> None:
        self.tower_restarts = Counter(
            "alexnet_tower_restarts_total",
            "Towers replaced after they died, by role (serving, training)",
            ["role"],
            registry=r,
        )
        self.recovery_seconds = Counter(
            "alexnet_recovery_seconds_total", "Seconds spent replacing lost towers, by role", ["role"], registry=r
        )

    def _grpc(self, r: CollectorRegistry) -> None:
        self.rpcs = Counter(
            "alexnet_grpc_server_handled_total", "RPCs handled, by method and code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "alexnet_grpc_server_handling_seconds", "RPC handling time", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )

    def prepare(self, config) -> None:
        """Create every tower/stage and exchange series at zero, so dashboards see them before training."""
        for protocol in (ALEXNET_V1, KSERVE_V2):
            self.classify_latency.labels(protocol)
        for role in ("serving", "training"):
            self.tower_restarts.labels(role)
            self.recovery_seconds.labels(role)
        for tower in range(config.towers):
            self.colour_specialisation.labels(str(tower)).set(math.nan)  # until a job's first validation
            for stage in config.stage_names:
                for direction in ("forward", "backward"):
                    self.tower_compute.labels("0", str(tower), stage, direction)
        for segment in config.segments[1:]:
            for direction in ("forward", "backward"):
                self.exchange_seconds.labels(segment[0].name, direction)
                self.exchange_bytes.labels(segment[0].name, direction)

    def observe_classify(self, protocol: str, code: grpc.StatusCode, seconds: float) -> None:
        self.classify_requests.labels(protocol, code.name).inc()
        self.classify_latency.labels(protocol).observe(seconds)

    def observe_queue(self, queue) -> None:
        """The classify queue's length, in requests and in images (each request holds its `items`)."""
        self.pending.set(len(queue))
        self.pending_images.set(sum(len(request.items) for request in queue))

    def serve_http(self, host: str, port: int) -> "MetricsEndpoint":
        """Serve /metrics from a process of its own (metrics_endpoint.py); OSError if it cannot listen."""
        return MetricsEndpoint(self.registry, host, port)


class MetricsEndpoint:
    """The /metrics process, and the thread here that renders the registry each time it asks."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._registry = registry
        script = Path(__file__).with_name("metrics_endpoint.py")
        self._process = subprocess.Popen(
            [sys.executable, str(script), host, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        first = self._process.stdout.readline().decode(errors="replace").strip()
        if not first.startswith("port "):
            self._process.wait()
            raise OSError(first.removeprefix("error ") or "the metrics endpoint's process ended at start")
        self.port = int(first.split()[1])
        self.pid = self._process.pid
        threading.Thread(target=self._answer_each, name="metrics-render", daemon=True).start()

    def _answer_each(self) -> None:
        for _ in self._process.stdout:  # one line per scrape
            text = generate_latest(self._registry)
            try:
                self._process.stdin.write(HEADER.pack(len(text)) + text)
                self._process.stdin.flush()
            except (BrokenPipeError, ValueError):  # the endpoint is gone, or closing
                return

    def close(self) -> None:
        """The endpoint ends when its stdin closes."""
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class GrpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs here besides reflection's, which pass through

    @contextmanager
    def _observed(self, method: str, context):
        """Count the RPC under its final status code (UNKNOWN if the handler raised without one) and time it."""
        start, failed = time.perf_counter(), False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            self.metrics.rpcs.labels(method, code.name).inc()
            self.metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)

    def _unary(self, method, behaviour):
        def wrapper(request, context):
            with self._observed(method, context):
                return behaviour(request, context)

        return wrapper

    def _stream(self, method, behaviour):
        def wrapper(request, context):
            with self._observed(method, context):
                yield from behaviour(request, context)

        return wrapper
