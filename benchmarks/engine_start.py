"""What a network change costs: new towers against the same towers rebuilt, alternated.

    python benchmarks/engine_start.py                  # width 0.125, 5 rounds
    python benchmarks/engine_start.py --width 1 --rounds 3

Each round times, in alternating order, (a) a new engine of the second network, from its
constructor to its first answer (its actors' processes start, import torch and link), then shut
down; and (b) an engine of the first network rebuilt in place for the second (engine.rebuild),
to its first answer. The second network differs in its class count and variant (caffe), as a
version published by a job on another dataset may. Prints each round and the medians. Not a
test: a run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import ray
    import torch

    from coordinator import ModelParallelAlexNet
    from towers import NetConfig

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    first = dict(num_classes=10, width=args.width)
    second = dict(num_classes=6, width=args.width, network="caffe")
    image = torch.zeros(1, 3, 227, 227)
    kept = ModelParallelAlexNet(**first)
    kept.predict(image)  # warm: the first answer's own costs fall on neither side
    new_times, rebuilt_times = [], []
    try:
        for round_ in range(args.rounds):
            for side in ("new", "rebuilt") if round_ % 2 == 0 else ("rebuilt", "new"):
                start = time.perf_counter()
                if side == "new":
                    engine = ModelParallelAlexNet(**second)
                    engine.predict(image)
                    new_times.append(time.perf_counter() - start)
                    engine.shutdown()
                else:
                    kept.rebuild(NetConfig(**second))
                    kept.predict(image)
                    rebuilt_times.append(time.perf_counter() - start)
                    kept.rebuild(NetConfig(**first))  # back, untimed, for the next round
            print(
                f"round {round_ + 1}: new towers {new_times[-1]:.2f} s, rebuilt {rebuilt_times[-1]:.2f} s", flush=True
            )
    finally:
        kept.shutdown()
    new, rebuilt = statistics.median(new_times), statistics.median(rebuilt_times)
    print(f"width {args.width}: new towers {new:.2f} s, rebuilt in place {rebuilt:.2f} s (medians of {args.rounds})")


if __name__ == "__main__":
    main()
