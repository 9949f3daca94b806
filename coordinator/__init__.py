"""Orchestration and the service: tower actors, the coordinator actor, the exchanges, data and training.

Names are imported on first use, so that Ray Data workers, which only need coordinator.images,
do not pay for importing torch and Ray's actor code.
"""

from importlib import import_module

_EXPORTS = {
    "ModelParallelAlexNet": "coordinator.engine",
    "Placement": "coordinator.engine",
    "ensure_ray": "coordinator.engine",
    "ObjectStoreExchange": "coordinator.exchange",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
