"""Orchestration and the service, one package per subsystem:

    engine/    the driver's handle (ModelParallelAlexNet), placement, the coordinator and tower actors, exchanges
    data/      images one at a time (torch-free), datasets, Ray Data batches, the built-in dataset
    training/  the recipe and run options (presets, overrides, schedules), the loop, checkpoints
    service/   the gRPC server: jobs, serving, the protocol adapters (alexnet.v1, Open Inference), errors, metrics

Imports flow one way: data <- training <- service, and engine <- training.
The engine's names are re-exported here on first use: importing a torch-free module (the recipe,
which the client reads) loads neither torch nor Ray.
"""

__all__ = ["ModelParallelAlexNet", "Placement", "ensure_ray"]


def __getattr__(name: str):
    if name in __all__:
        import coordinator.engine

        return getattr(coordinator.engine, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
