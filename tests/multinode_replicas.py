"""Two replica groups on a Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster:
one raylet per node), training; the node of group 1 is removed mid-run. Prints one JSON line: where
the towers were before and after, the run's events, and whether the groups still agree.

Run by tests/test_replicas.py in a process of its own, since it starts its own Ray cluster:
    python tests/multinode_replicas.py WORKDIR
"""

import json
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from coordinator import ModelParallelAlexNet  # noqa: E402
from coordinator.data.patterns import generate  # noqa: E402
from coordinator.training import run_spec, train  # noqa: E402

REMOVE_AFTER_STEP = 3


def main(workdir: Path) -> None:
    cluster, workers = start_cluster()
    data = generate(workdir / "patterns", train_per_class=8, val_per_class=2)
    spec = small_spec()
    engine = ModelParallelAlexNet(
        num_classes=10,
        dropout=spec.recipe.dropout,
        lr=spec.recipe.lr,
        seed=spec.recipe.seed,
        init=spec.recipe.init,
        width=spec.recipe.width,
        image_size=227,
        replicas=2,
    )
    before = [dict(tower) for tower in engine.tower_info]
    coordinator_before = coordinator_node(engine)
    loss = NodeLoss(cluster, next(w for w in workers if w.node_id == before[2]["node"]))
    result = train(data / "train", spec, engine=engine, on_event=loss.on_event, checkpoint_dir=workdir / "checkpoints")
    print(
        json.dumps(
            {
                "before": [{"node": t["node"], "tower": t["tower"]} for t in before],
                "after": [{"node": t["node"], "tower": t["tower"]} for t in engine.tower_info],
                "removed": loss.removed,
                "driver_node": ray.get_runtime_context().get_node_id(),
                "coordinator_nodes": [coordinator_before, coordinator_node(engine)],
                "events": loss.events,
                "checksums": engine.replica_checksums(),
                "state": result.state,
                "steps": result.steps,
                "restarts": result.restarts,
            }
        )
    )
    engine.shutdown()
    ray.shutdown()
    cluster.shutdown()


def start_cluster() -> tuple[Cluster, list]:
    """A head node where no group fits (the driver's), and three worker nodes: one spare. Ray joined to it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(3)]  # a group needs 2 CPUs on one node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, workers


def small_spec():
    overrides = {"width": "0.125", "batch_size": "8", "epochs": "2", "snapshot_every": "2"}
    return run_spec("demo", {**overrides, "publish_every": "1000", "replicas": "2", "init": "pytorch"})


def coordinator_node(engine) -> str:
    return ray.get(engine.coordinator.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


class NodeLoss:
    """Records the run's events, and removes a group's node after step REMOVE_AFTER_STEP."""

    def __init__(self, cluster, node):
        self.cluster, self.node = cluster, node
        self.events, self.removed = [], []

    def on_event(self, progress) -> None:
        self.events.append({"kind": progress.kind, "step": progress.step, "message": progress.message})
        if progress.kind == "step" and progress.step == REMOVE_AFTER_STEP and not self.removed:
            self.removed.append(self.node.node_id)
            # From another thread: remove_node waits for the raylet to go, while the run goes on.
            threading.Thread(target=self.cluster.remove_node, args=(self.node,), daemon=True).start()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
