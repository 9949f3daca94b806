"""What a TensorBoard log costs a training step: paired runs with and without it, alternated.

    python benchmarks/board_cost.py                      # the demo preset (full width, batch 64)
    python benchmarks/board_cost.py --pairs 3 --steps 20 --set width=0.5

Each pair trains the same recipe twice on the same towers, once with a log_dir and once without,
in alternating order (so drift in the machine's speed falls on both sides). Every run publishes
every `publish_every` steps, as the server's jobs do, and validates once at its end. Prints, per
run, the seconds per step (the whole run's time over its steps), and, per pair, the difference;
then the medians, and the board's own time (its calls, timed inside the runs that log), as a
share of a step. Not a test: a run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per run (one epoch, then its validation)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a recipe field or run option"
    )
    args = parser.parse_args()

    import ray

    from coordinator import ModelParallelAlexNet
    from coordinator.data import open_dataset
    from coordinator.data.patterns import generate
    from coordinator.training import board, run_spec, train

    overrides = dict(item.split("=", 1) for item in args.set)
    spec = run_spec("demo", {"epochs": 1, "steps_per_epoch": args.steps, "val_images": 64, **overrides})
    recipe, options = spec
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)  # before the dataset, which uses Ray Data
    root = generate(Path(tempfile.gettempdir()) / "alexnet-mp-board-bench")
    dataset = open_dataset(root / "train", root / "val")
    engine = ModelParallelAlexNet(
        num_classes=dataset.num_classes,
        width=recipe.width,
        init=recipe.init,
        seed=recipe.seed,
        precision=options.precision,
    )
    board_seconds = timed_board(board.TrainingBoard)
    print(
        f"recipe: demo, width {recipe.width}, batch {recipe.batch_size}, {args.steps} steps a run, publish every "
        f"{options.publish_every}, precision {options.precision}; histograms every {board.HISTOGRAM_EVERY} steps"
    )
    try:
        train(dataset, spec, engine=engine, on_publish=lambda step, state: None)  # warm-up: first-call costs
        pairs = []
        with tempfile.TemporaryDirectory() as logs:
            for pair in range(args.pairs):
                seconds = {}
                for logged in (True, False) if pair % 2 == 0 else (False, True):
                    log_dir = Path(logs) / f"run{pair}" if logged else None
                    start = time.perf_counter()
                    result = train(dataset, spec, engine=engine, on_publish=lambda step, state: None, log_dir=log_dir)
                    seconds[logged] = (time.perf_counter() - start) / result.steps
                pairs.append(seconds)
                print(
                    f"pair {pair + 1}: with the log {seconds[True]:.3f} s/step, without {seconds[False]:.3f} s/step, "
                    f"difference {1e3 * (seconds[True] - seconds[False]):+.1f} ms ({share(seconds):+.2%})"
                )
    finally:
        engine.shutdown()
    without = statistics.median(p[False] for p in pairs)
    per_step = sum(board_seconds) / (args.pairs * args.steps)
    print(
        f"median: with the log {statistics.median(p[True] for p in pairs):.3f} s/step, without {without:.3f} s/step; "
        f"median difference {statistics.median(share(p) for p in pairs):+.2%} of a step"
    )
    print(f"the board's own calls: {1e3 * per_step:.1f} ms a step, {per_step / without:.2%} of a step")


def share(seconds: dict) -> float:
    return (seconds[True] - seconds[False]) / seconds[False]


def timed_board(cls) -> list[float]:
    """Time every call of the board's methods into the list returned."""
    spent: list[float] = []
    for name in ("__init__", "step", "validation", "kernels", "weights", "went_back", "close"):
        method = getattr(cls, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        setattr(cls, name, timed)
    return spent


if __name__ == "__main__":
    main()
