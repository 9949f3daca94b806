"""The gRPC service: the server's wiring (server.py), proto <-> domain (convert.py), the servicers
and their one error mapping (servicers.py, errors.py), training jobs (jobs.py), serving with model
versions and the batcher (serving.py), and Prometheus metrics (metrics.py)."""

from coordinator.service.server import ServeOptions, Server

__all__ = ["ServeOptions", "Server"]
