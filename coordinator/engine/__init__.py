"""The distributed engine: the driver's handle, placement, the coordinator and tower actors, and
the exchanges between the towers (autograd collectives over their process groups)."""

from coordinator.engine.failures import FailureDecision, FailurePolicy, TowerFailure, named
from coordinator.engine.links import RETIRED_TRANSPORTS, TRANSPORT_CHOICES, ExchangeError, PeerFailed, error_summary
from coordinator.engine.model import ModelParallelAlexNet
from coordinator.engine.placement import Placement, ensure_ray

__all__ = [
    "ExchangeError",
    "FailureDecision",
    "FailurePolicy",
    "ModelParallelAlexNet",
    "PeerFailed",
    "Placement",
    "RETIRED_TRANSPORTS",
    "TRANSPORT_CHOICES",
    "TowerFailure",
    "ensure_ray",
    "error_summary",
    "named",
]
