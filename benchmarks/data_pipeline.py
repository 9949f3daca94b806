"""Is the loader ahead of training? Images/s the Ray Data loader delivers, beside what a step consumes.

    python benchmarks/data_pipeline.py                 # the built-in dataset, batch 128
    python benchmarks/data_pipeline.py --data DIR      # any ImageFolder training folder

Three measurements in one run, each a median over several batches after a warm-up:
  loader    decode + augment + batch, nothing else running
  training  the two-tower train step on batches already in memory
  together  training fed by the loader, as the training loop runs it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rate(times, batch):
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ImageFolder training folder (default: the built-in dataset)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--cpus", type=int, default=6, help="logical CPUs for the local Ray")
    args = parser.parse_args()

    import ray

    from coordinator import ModelParallelAlexNet
    from coordinator.data import batches, open_dataset
    from coordinator.patterns import default_root, generate

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    train_dir = Path(args.data) if args.data else generate(default_root()) / "train"
    val_dir = train_dir.parent / "val"  # the built-in dataset's held-out folder; else a share is held out
    dataset = open_dataset(train_dir, val_dir if val_dir.is_dir() else None, stats="imagenet")
    need = (args.batches + 2) * args.batch
    samples = (dataset.train * (need // len(dataset.train) + 1))[:need]

    def timed(iterator, work=lambda b: None):
        times, last = [], time.perf_counter()
        for batch in iterator:
            work(batch)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        return times[2:]  # the first batches include the pipeline's start-up

    loader = timed(batches(samples, dataset.stats, args.batch, "train"))
    engine = ModelParallelAlexNet(num_classes=dataset.num_classes, init="kaiming")
    fixed = next(batches(samples, dataset.stats, args.batch, "eval"))
    training = timed(iter([fixed] * (args.batches + 2)), lambda b: engine.train_step(b.images, b.labels))
    together = timed(
        batches(samples, dataset.stats, args.batch, "train"), lambda b: engine.train_step(b.images, b.labels)
    )
    engine.shutdown()

    loader_rate, train_rate, together_rate = (rate(t, args.batch) for t in (loader, training, together))
    print(f"dataset: {train_dir} ({len(dataset.train)} training images), batch {args.batch}")
    print(f"loader alone:            {loader_rate:7.1f} images/s")
    print(f"training alone:          {train_rate:7.1f} images/s")
    print(f"loader / training:       {loader_rate / train_rate:7.2f}x  (target: at least 2x)")
    print(f"training fed by loader:  {together_rate:7.1f} images/s ({together_rate / train_rate:.0%} of training alone)")
    ray.shutdown()


if __name__ == "__main__":
    main()
