"""Recovery from a killed training tower: how long until training proceeds, and what is lost.

    python benchmarks/recovery.py                  # the demo preset on the built-in dataset
    python benchmarks/recovery.py --kills 3 --set width=0.5

Trains with the demo recipe and kill -9s a tower's process (the pid its describe() gives) at
--kill-at steps, --kills times at --every steps apart. For each kill prints the seconds from the
kill until the next step completed, the recovery's own seconds (replacing actors, restoring the
snapshot, restarting the data at the snapshot's place) and the steps to redo, then the run's
result. Not a test: a run.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-at", type=int, default=15, help="the step after which the first kill comes")
    parser.add_argument("--every", type=int, default=15, help="steps between kills")
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe field or run option"
    )
    return parser.parse_args()


class Kills:
    """Kills a training tower's process after each of the steps `kills_at`, towers in turn, from the
    run's events; times each kill until the next step is done, and collects the recoveries."""

    def __init__(self, engine, kills_at: list[int]):
        self.engine, self.kills_at = engine, kills_at
        self.killed, self.recoveries, self.steps = [], [], []

    def on_event(self, event) -> None:
        if event.kind == "step":
            self.steps.append(event.step_seconds)
            if self.killed and "next" not in self.killed[-1]:
                self.killed[-1]["next"] = time.perf_counter()
            if self.kills_at and event.step == self.kills_at[0]:
                self.kills_at.pop(0)
                tower = len(self.killed) % 2
                os.kill(self.engine.tower_info[tower]["pid"], signal.SIGKILL)
                self.killed.append({"at": time.perf_counter(), "tower": tower, "step": event.step})
        elif event.kind == "recovered":
            self.recoveries.append((event.recovery_seconds, event.message))

    def report(self) -> None:
        for kill, (seconds, message) in zip(self.killed, self.recoveries):
            after = (
                f"next step done {kill['next'] - kill['at']:.1f} s later"
                if "next" in kill
                else "no step after it (validation)"
            )
            print(
                f"tower {kill['tower']} killed after step {kill['step']}: {after}; "
                f"the recovery itself {seconds:.1f} s; {message}"
            )


def main() -> None:
    args = parse_args()

    import ray

    from coordinator import ModelParallelAlexNet
    from coordinator.data import open_dataset
    from coordinator.data.patterns import generate
    from coordinator.training import run_spec, train

    overrides = dict(item.split("=", 1) for item in args.set)
    spec = run_spec("demo", {"epochs": args.epochs, "max_restarts": args.kills, **overrides})
    recipe = spec.recipe
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)  # before the dataset, which uses Ray Data
    root = generate(Path(tempfile.gettempdir()) / "alexnet-mp-recovery-bench")
    dataset = open_dataset(root / "train", root / "val")
    engine = ModelParallelAlexNet(
        num_classes=dataset.num_classes, width=recipe.width, init=recipe.init, seed=recipe.seed
    )
    kills = Kills(engine, [args.kill_at + i * args.every for i in range(args.kills)])
    print(
        f"demo recipe, snapshot_every {spec.options.snapshot_every}, width {recipe.width}, batch {recipe.batch_size}; "
        f"kills after steps {kills.kills_at}",
        flush=True,
    )
    result = train(dataset, spec, on_event=kills.on_event, engine=engine)
    engine.shutdown()
    print()
    kills.report()
    print(
        f"median step {statistics.median(kills.steps):.2f} s; result: {result.state}, {result.steps} steps, "
        f"{result.restarts} restarts, validation top-1 {result.top1:.1%}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
