"""Transports: how exchanged tensors travel between the towers. See base.py for the seam."""

from coordinator.engine.transport.base import (
    EXCHANGE_TIMEOUT,
    Exchange,
    ExchangeError,
    InferenceGraph,
    Received,
    Transport,
    error_summary,
    from_wire,
    to_wire,
)
from coordinator.engine.transport.collective import CollectiveTransport
from coordinator.engine.transport.object_store import ObjectStoreTransport

# Every transport by name. The equivalence tests run on each one listed here.
TRANSPORTS: dict[str, type[Transport]] = {cls.name: cls for cls in (ObjectStoreTransport, CollectiveTransport)}
CHOICES = ("auto", *TRANSPORTS)


def check_transport(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown transport {name!r}: choose one of {', '.join(CHOICES)}")
    return name


def make_transport(name: str, devices: str = "cpu", timeout: float = EXCHANGE_TIMEOUT) -> Transport:
    """The transport called `name` for towers placed on `devices` (a Placement kind: gpu, shared-gpu, cpu).

    "auto" is the collective over NCCL when every tower has a GPU of its own. Elsewhere it is the
    object store: on CPUs its shared memory beat Gloo over loopback TCP (docs/performance.md), and
    NCCL cannot put two ranks on one shared GPU.
    """
    if check_transport(name) == "auto":
        name = "collective" if devices == "gpu" else "object_store"
    return TRANSPORTS[name].for_devices(devices, timeout)


__all__ = [
    "CHOICES",
    "TRANSPORTS",
    "CollectiveTransport",
    "EXCHANGE_TIMEOUT",
    "Exchange",
    "ExchangeError",
    "InferenceGraph",
    "ObjectStoreTransport",
    "Received",
    "Transport",
    "check_transport",
    "error_summary",
    "from_wire",
    "to_wire",
    "make_transport",
]
