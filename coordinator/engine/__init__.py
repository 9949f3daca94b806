"""The distributed engine: the driver's handle, placement, the coordinator and tower actors, transports."""

from coordinator.engine.coordinator_actor import TowerFailure, named
from coordinator.engine.model import ModelParallelAlexNet
from coordinator.engine.placement import Placement, ensure_ray
from coordinator.engine.transport import CHOICES as TRANSPORT_CHOICES
from coordinator.engine.transport import TRANSPORTS, ExchangeError, error_summary

__all__ = ["TRANSPORTS", "TRANSPORT_CHOICES", "ExchangeError", "ModelParallelAlexNet", "Placement", "TowerFailure", "ensure_ray", "error_summary", "named"]
