"""The gRPC service: the server's wiring (server.py); two sibling protocol adapters, alexnet.v1
(servicers.py, with proto <-> domain in convert.py) and the Open Inference Protocol (kserve.py),
over what they share (protocol.py: the one error mapping of errors.py's kinds, deadlines, the
image checks); a training job (job.py), the job table (jobs.py) and a job's metrics
(job_metrics.py); model versions (versions.py), serving with the batcher (serving.py) and its
share of the machine while a job trains (serving_policy.py), checked requests (requests.py), the
state dir (state.py), tokens, TLS and the loopback default (security.py), and Prometheus metrics
(metrics.py), answered from a process of their own (metrics_endpoint.py)."""

from coordinator.service.security import SecurityError
from coordinator.service.server import ServeOptions, Server

__all__ = ["SecurityError", "ServeOptions", "Server"]
