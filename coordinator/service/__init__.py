"""The gRPC service: the server's wiring (server.py), proto <-> domain (convert.py), the servicers
and their one error mapping (servicers.py, errors.py), training jobs (jobs.py), model versions
(versions.py), serving with the batcher (serving.py) and its share of the machine while a job
trains (serving_policy.py), checked requests (requests.py), the state dir (state.py), tokens, TLS
and the loopback default (security.py), and Prometheus metrics (metrics.py), answered from a
process of their own (metrics_endpoint.py)."""

from coordinator.service.security import SecurityError
from coordinator.service.server import ServeOptions, Server

__all__ = ["SecurityError", "ServeOptions", "Server"]
