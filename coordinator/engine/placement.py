"""Where the towers run: joining or starting Ray, and one GPU each, a shared GPU, or CPU cores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import ray

# One GPU hosts this many models' towers when it is shared: the server's training and serving pairs.
MODELS_PER_SHARED_GPU = 2


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join the Ray already initialised, or at `address` (else RAY_ADDRESS), or start a local one.

    A local Ray gets at least 6 logical CPUs whatever the machine has: a training pair and a
    serving pair of towers take one each, and data loading needs room beside them. The physical
    cores are shared; Ray's CPU count only decides what may be scheduled.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 6), include_dashboard=False)
        private_ray_token()


def private_ray_token() -> None:
    """Make Ray's token file readable by its owner only (Ray 2.60 writes it 0644).

    Ray 2.60's own processes listen on every interface, and nothing in its configuration binds them
    to loopback; its token (on by default outside the tests) is what keeps others out, so no one
    else on the machine may read it.
    """
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        if os.stat(path).st_uid == os.getuid():
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # token authentication is off, or the token came from RAY_AUTH_TOKEN


def free_devices() -> dict:
    """The CPUs and GPUs the connected Ray cluster has free now."""
    return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}


@dataclass(frozen=True)
class Placement:
    """Where the towers go: one GPU each, a shared GPU, or CPU cores."""

    kind: str  # "gpu", "shared-gpu" or "cpu"
    actor_options: dict

    @staticmethod
    def plan(towers: int, cpus_per_tower: int = 1, resources: Optional[dict] = None) -> "Placement":
        """Placement for `towers` on a cluster with `resources` (default: the connected Ray cluster's)."""
        resources = ray.cluster_resources() if resources is None else resources
        gpus = int(resources.get("GPU", 0))
        if gpus >= towers:
            return Placement("gpu", {"num_gpus": 1, "num_cpus": 1})
        if gpus >= 1:
            share = 1.0 / (MODELS_PER_SHARED_GPU * towers)  # a quarter each for two towers
            return Placement("shared-gpu", {"num_gpus": share, "num_cpus": 1})
        cpus = resources.get("CPU", 0)
        if cpus < towers * cpus_per_tower:
            raise RuntimeError(
                f"the Ray cluster has {cpus:g} CPUs and no GPU, but {towers} towers need "
                f"{towers * cpus_per_tower} CPUs; start Ray with more (ray.init(num_cpus=...)) or add nodes"
            )
        return Placement("cpu", {"num_cpus": cpus_per_tower})
