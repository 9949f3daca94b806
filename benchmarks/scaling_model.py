"""A model on paper of data-parallel replicas: step time and images/s at 1, 2, 8 and 32 groups of
two towers (2, 4, 16 and 64 GPUs), from measured per-step compute and exchange volumes.

    python benchmarks/scaling_model.py                      # the figures in docs/scaling.md
    python benchmarks/scaling_model.py --tower-compute 0.0135 --overhead 0.02

Not a measurement: arithmetic on the inputs below, which come from the H200 run of
benchmarks/gpu_check.sh (docs/performance.md, "GPU") and from the network's table. Each step is
overhead + tower compute + the pair's exchanges + the gradient all-reduce, nothing overlapped.
Two overheads: the engine before its one-call step (measured on the H200), and the one-call
step's (predicted: its one Ray call per tower is submitted while the step before runs, which
leaves the nine collectives' latency and one synchronisation; see docs/scaling.md). The
all-reduce is a ring: each rank sends and receives 2(R-1)/R of the gradients, in 2(R-1) steps of latency.
"""

from __future__ import annotations

import argparse

from towers import NetConfig

GB = 1e9
LINKS = {  # bytes/s each rank can send (and receive) at once, and the latency of one ring step
    "100GbE": (12.5 * GB, 25e-6),  # one NIC per node, a group (two GPUs) per node: two ranks share it
    "NVLink": (450 * GB, 5e-6),  # NVLink 4 (H100/H200), per GPU and direction, every GPU in one domain
}


def ring_allreduce_seconds(size: float, ranks: int, bandwidth: float, latency: float) -> float:
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size / bandwidth + 2 * (ranks - 1) * latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per group per step (the paper's 128)")
    parser.add_argument(
        "--tower-compute",
        type=float,
        default=0.0175,
        help="s of one tower's forward+backward at --batch on its own GPU (default: half the H200's, "
        'where two towers shared it; docs/performance.md, "GPU")',
    )
    parser.add_argument(
        "--old-overhead",
        type=float,
        default=0.078,
        help="s per step of Ray calls and host staging before the one-call step (default: the H200's step less its "
        'compute; docs/performance.md, "GPU")',
    )
    parser.add_argument(
        "--overhead",
        type=float,
        default=0.002,
        help="s per step the one-call step adds, predicted: nine NCCL collectives' latency, one synchronisation",
    )
    args = parser.parse_args()

    config = NetConfig()
    gradient_bytes = config.parameter_count() * 4 / config.towers  # float32, each tower's half
    fc_share = sum(s.parameter_count for s in config.shapes if s.layer.kind == "fc") / config.parameter_count()
    scale = args.batch / 128
    pair_bytes = 62.1e6 * scale  # both ways between the towers at batch 128 (docs/performance.md, "Exchanges")
    print(
        f"per tower: {gradient_bytes / 1e6:.1f} MB of float32 gradients, {fc_share:.1%} of them the fc layers'; "
        f"between the pair: {pair_bytes / 1e6:.1f} MB a step at batch {args.batch}"
    )
    print(
        f"tower compute {args.tower_compute * 1000:.1f} ms; "
        f"overhead {args.old_overhead * 1000:.0f} ms a step before the "
        f"one-call step, {args.overhead * 1000:.0f} ms with it\n"
    )
    print(
        "| GPUs | groups | link | all-reduce ms | step ms, before | images/s "
        "| step ms, one-call step | images/s | all-reduce share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for groups in (1, 2, 8, 32):
        for link, (bandwidth, latency) in LINKS.items():
            per_rank = bandwidth / (2 if link == "100GbE" else 1)  # the node's two towers share its NIC
            allreduce = ring_allreduce_seconds(gradient_bytes, groups, per_rank, latency)
            pair = pair_bytes / LINKS["NVLink"][0]  # a group's towers share a node: NVLink between them
            lean = args.tower_compute + pair + allreduce
            before, now = args.old_overhead + lean, args.overhead + lean
            images = args.batch * groups
            print(
                f"| {2 * groups} | {groups} | {link if groups > 1 else '-'} | {allreduce * 1000:.1f} "
                f"| {before * 1000:.0f} | {images / before:,.0f} "
                f"| {now * 1000:.1f} | {images / now:,.0f} | {allreduce / now:.0%} |"
            )
            if groups == 1:
                break  # one group: no all-reduce, the link does not matter


if __name__ == "__main__":
    main()
