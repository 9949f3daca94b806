"""Is the loader ahead of training? Whole passes of the Ray Data loader, beside what training consumes.

    python benchmarks/data_pipeline.py                 # the built-in dataset, batch 128, 3 passes
    python benchmarks/data_pipeline.py --data DIR      # any ImageFolder training folder

A pass is timed whole, as an epoch meets it, and split in two:
  start-up  from asking for the pass to its first batch (Ray Data planning and starting its
            tasks, the first blocks' decoding): the towers wait this long at the start of
            every training pass and every validation pass
  steady    images/s from the first batch to the last
  whole     images/s over the whole pass, start-up included
(A median of the gaps between batches would not do: once the pipeline has run ahead, that is the
speed of reading buffered batches, not of decoding them.)

Measurements, alternated pass by pass so that drift in the machine hits all alike, medians over
--passes:
  loader        a training pass (decode + augment + batch) with nothing else running
  validation    an evaluation pass over the held-out images (centre crops), loader only
  training      the two-tower step on a batch already in memory, pipelined as the loop runs it
  together      a training pass fed by the loader, started when it is read
  early         the same, but started (loader.EarlyStart) --steps steps of training before it is
                read, as the training loop starts each pass during the previous one; with
  beside early  the rate of those steps, which share the machine with the pass's start-up
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from train_step import pipelined_steps  # benchmarks/, which Python puts first on the path for a script here


@dataclass
class Pass:
    startup: float  # seconds to the first batch
    steady: float  # images/s after it
    whole: float  # images/s over the pass

    def __str__(self) -> str:
        return f"start-up {self.startup:5.2f} s, steady {self.steady:6.1f} images/s, whole {self.whole:6.1f} images/s"


def timed_pass(loader, consume=lambda batch: None, finish=lambda: None) -> Pass:
    start = time.perf_counter()
    first, first_images, images = None, 0, 0
    for batch in loader:
        if first is None:
            first, first_images = time.perf_counter(), len(batch.labels)
        consume(batch)
        images += len(batch.labels)
    finish()
    end = time.perf_counter()
    return Pass(first - start, (images - first_images) / max(end - first, 1e-9), images / (end - start))


def median_pass(passes: list[Pass]) -> Pass:
    return Pass(*(statistics.median(getattr(p, f) for p in passes) for f in ("startup", "steady", "whole")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ImageFolder training folder (default: the built-in dataset)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3, help="passes of each kind")
    parser.add_argument("--images", type=int, default=0, help="images per training pass (0: the whole training set)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of training alone, per pass")
    parser.add_argument("--cpus", type=int, default=6, help="logical CPUs for the local Ray")
    return parser.parse_args()


def training_set(args):
    """The training folder, its dataset, and the samples of a training pass (--images of them, repeated as needed)."""
    from coordinator.data import open_dataset
    from coordinator.data.patterns import default_root, generate

    train_dir = Path(args.data) if args.data else generate(default_root()) / "train"
    val_dir = train_dir.parent / "val"  # the built-in dataset's held-out folder; else a share is held out
    dataset = open_dataset(train_dir, val_dir if val_dir.is_dir() else None, stats="imagenet")
    samples = dataset.train
    if args.images:
        samples = (samples * (args.images // len(samples) + 1))[: args.images]
    return train_dir, dataset, samples


def measure(args, engine, dataset, samples) -> tuple[dict, list, list]:
    """--passes of each kind, alternated: the passes by kind, training alone's images/s, and beside an early start."""
    from coordinator.data import batches
    from coordinator.data.loader import EarlyStart
    from coordinator.training.loop import StepPipeline

    pipeline = StepPipeline(engine)
    with closing(batches(samples, dataset.stats, args.batch, "eval")) as loader:
        fixed = next(loader)

    def train(batch):
        pipeline.submit(batch.crops, batch.labels)

    def training_alone() -> float:
        """Images/s of the median pipelined step on the fixed batch (after one warm-up step)."""
        return len(fixed.labels) / statistics.median(
            pipelined_steps(engine, fixed.crops, fixed.labels, args.steps + 1)[1:]
        )

    runs = {"loader": [], "validation": [], "together": [], "early": []}
    training, beside_early = [], []
    for p in range(args.passes):
        runs["loader"].append(timed_pass(batches(samples, dataset.stats, args.batch, "train", epoch=3 * p)))
        runs["validation"].append(timed_pass(batches(dataset.val, dataset.stats, 64, "eval")))
        training.append(training_alone())
        together = batches(samples, dataset.stats, args.batch, "train", epoch=3 * p + 1)
        runs["together"].append(timed_pass(together, train, pipeline.finish))
        with closing(EarlyStart(batches(samples, dataset.stats, args.batch, "train", epoch=3 * p + 2))) as early:
            beside_early.append(training_alone())
            runs["early"].append(timed_pass(early, train, pipeline.finish))
        print(f"pass {p + 1}/{args.passes}: " + "; ".join(f"{k} {v[-1]}" for k, v in runs.items()), flush=True)
    return runs, training, beside_early


def print_summary(args, train_dir, dataset, samples, runs: dict, training: list, beside_early: list) -> None:
    loader, together, train_rate = (
        median_pass(runs["loader"]),
        median_pass(runs["together"]),
        statistics.median(training),
    )
    early = median_pass(runs["early"])
    print(
        f"dataset: {train_dir}; training passes of {len(samples)} images, batch {args.batch}; "
        f"validation passes of {len(dataset.val)} images; medians of {args.passes} passes"
    )
    print(f"loader alone:           {loader}")
    print(f"validation loader:      {median_pass(runs['validation'])}")
    print(f"training alone:         {train_rate:6.1f} images/s")
    print(f"training fed by loader: {together}")
    print(f"the same, started early: {early}")
    print(f"training beside an early start: {statistics.median(beside_early):6.1f} images/s")
    print(f"loader steady / training: {loader.steady / train_rate:.2f}x (target: at least 2x)")
    print(
        f"training fed by the loader, whole pass: {together.whole / train_rate:.0%} of training alone; "
        f"{early.whole / train_rate:.0%} started early"
    )


def main() -> None:
    args = parse_args()

    import ray

    from coordinator import ModelParallelAlexNet

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    train_dir, dataset, samples = training_set(args)
    engine = ModelParallelAlexNet(num_classes=dataset.num_classes, init="kaiming")
    runs, training, beside_early = measure(args, engine, dataset, samples)
    engine.shutdown()
    print()
    print_summary(args, train_dir, dataset, samples, runs, training, beside_early)
    ray.shutdown()


if __name__ == "__main__":
    main()
