"""The distributed engine: the driver's handle, placement, the coordinator and tower actors, transports."""

from coordinator.engine.model import ModelParallelAlexNet
from coordinator.engine.placement import Placement, ensure_ray
from coordinator.engine.transport import TRANSPORTS

__all__ = ["TRANSPORTS", "ModelParallelAlexNet", "Placement", "ensure_ray"]
