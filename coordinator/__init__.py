"""Orchestration and the service, one package per subsystem:

    engine/    the driver's handle (ModelParallelAlexNet), placement, the coordinator and tower actors, exchanges
    data/      images one at a time (torch-free), datasets, Ray Data batches, the built-in dataset
    training/  the recipe (presets, overrides, schedules), the loop, checkpoints
    service/   the gRPC server: jobs, serving, the protocol adapters (alexnet.v1, Open Inference), errors, metrics

Imports flow one way: data <- training <- service, and engine <- training.
"""

from coordinator.engine import ModelParallelAlexNet, Placement, ensure_ray

__all__ = ["ModelParallelAlexNet", "Placement", "ensure_ray"]
