"""The gRPC service: the server's wiring (server.py), proto <-> domain (convert.py), the servicers
and their one error mapping (servicers.py, errors.py), training jobs (jobs.py), serving with model
versions and the batcher (serving.py), checked requests (requests.py), the state dir (state.py),
tokens, TLS and the loopback default (security.py), and Prometheus metrics (metrics.py)."""

from coordinator.service.security import SecurityError
from coordinator.service.server import ServeOptions, Server

__all__ = ["SecurityError", "ServeOptions", "Server"]
