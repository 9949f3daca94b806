"""Where the towers run: joining or starting Ray, and one GPU each, a shared GPU, or CPU cores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# One GPU hosts this many models' towers when it is shared: the server's training and serving pairs.
MODELS_PER_SHARED_GPU = 2


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join the Ray already initialised, or at `address` (else RAY_ADDRESS), or start a local one.

    A local Ray gets at least 8 logical CPUs whatever the machine has: a serving pair of towers
    and a training job of up to two replica groups take one each, and data loading needs room
    beside them. The physical cores are shared; Ray's CPU count only decides what may be scheduled.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray starts its workers at niceness 15 by default, below the server's own threads. A local
        # Ray here starts them at 0 instead: serving can then be put anywhere below training (serve
        # --serving-nice), the full 19 steps, rather than the 4 left above 15.
        system_config = {} if RAY_NICENESS_ENV in os.environ else {"worker_niceness": LOCAL_WORKER_NICENESS}
        ray.init(
            num_cpus=num_cpus or max(os.cpu_count() or 1, 8), include_dashboard=False, _system_config=system_config
        )
        global _started_here
        _started_here = True
        private_ray_token()


RAY_NICENESS_ENV = "RAY_worker_niceness"
RAY_DEFAULT_WORKER_NICENESS = 15  # Ray's own, for a cluster this process joins
LOCAL_WORKER_NICENESS = 0
_started_here = False


def worker_niceness() -> int:
    """The CPU niceness Ray gives its worker processes, the towers: the environment's, else 0 for
    a Ray that ensure_ray started, else Ray's default."""
    if RAY_NICENESS_ENV in os.environ:
        return int(os.environ[RAY_NICENESS_ENV])
    return LOCAL_WORKER_NICENESS if _started_here else RAY_DEFAULT_WORKER_NICENESS


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

    def reserve_groups(self, replicas: int, towers: int, timeout: float):
        """For replicas > 1: one placement group whose bundle g holds replica group g's towers, so
        that each group's towers share a node (a bundle is never split) while the groups spread
        over nodes where there are several (SPREAD). None for one group: Ray places its towers."""
        if replicas == 1:
            return None
        per_group = {("CPU" if k == "num_cpus" else "GPU"): v * towers for k, v in self.actor_options.items()}
        groups = ray.util.placement_group([per_group] * replicas, strategy="SPREAD")
        try:
            ray.get(groups.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(groups)
            raise RuntimeError(
                f"the {replicas} replica groups could not be placed within {timeout:g} s: each needs {per_group} "
                f"on one node, and the cluster has {free_devices()} free; use fewer replicas or add nodes"
            ) from None
        return groups

    @staticmethod
    def in_group(groups, g: int) -> dict:
        """Actor options that put an actor in replica group g's bundle (none without groups)."""
        if groups is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(groups, placement_group_bundle_index=g)}

    @staticmethod
    def release_groups(groups) -> None:
        if groups is not None:
            ray.util.remove_placement_group(groups)
