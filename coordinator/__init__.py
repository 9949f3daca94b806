"""Orchestration and the service: tower actors, the coordinator actor, and the exchanges between them."""

from coordinator.engine import ModelParallelAlexNet, Placement, ensure_ray
from coordinator.exchange import ObjectStoreExchange

__all__ = ["ModelParallelAlexNet", "ObjectStoreExchange", "Placement", "ensure_ray"]
