"""Transports: how exchanged tensors travel between the towers. See base.py for the seam."""

from coordinator.engine.transport.base import InferenceGraph, Received, Transport
from coordinator.engine.transport.object_store import ObjectStoreTransport

# Every transport by name. The equivalence tests run on each one listed here.
TRANSPORTS: dict[str, type[Transport]] = {cls.name: cls for cls in (ObjectStoreTransport,)}


def make_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}: choose one of {', '.join(TRANSPORTS)}")
    return TRANSPORTS[name]()


__all__ = ["TRANSPORTS", "InferenceGraph", "ObjectStoreTransport", "Received", "Transport", "make_transport"]
