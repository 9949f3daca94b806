"""Classification latency: in-process PyTorch, the two-tower engine, and the gRPC service, side by side.

    python benchmarks/classify.py                      # batch 1, 8 and 32, full-size network
    python benchmarks/classify.py --batches 1 --requests 200

For each batch size, requests rotate between the three paths (in-process, engine, gRPC), so
drift in the machine hits all alike; medians (p50) and p90 over --requests each. Same total
CPU threads: the in-process forward runs on --threads threads, each tower on --threads / 2.
  in-process  towers.AlexNet(...).eval()(x) in this process: plain PyTorch
  engine      ModelParallelAlexNet.predict(x): the serving path inside the server
  grpc        AlexNetClient.classify(tensors) to a Server on loopback: the engine plus gRPC,
              request decoding and the batcher
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per path and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args()

    import ray

    from client import AlexNetClient
    from coordinator.service import Server, ServeOptions
    from towers import AlexNet

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    sizes = [int(b) for b in args.batches.split(",")]
    server = Server(ServeOptions(port=0, metrics_port=-1, width=args.width, max_batch=max(sizes))).start()
    engine = server.classifier.engine  # the serving pair itself
    reference = AlexNet(num_classes=engine.config.num_classes, width=args.width).eval()
    reference.load_state_dict(engine.state_dict())
    client = AlexNetClient(f"127.0.0.1:{server.port}")
    client.wait_ready()

    def in_process(x):
        torch.set_num_threads(args.threads)
        with torch.no_grad():
            reference(x)

    paths = {
        "in-process": in_process,
        "engine": engine.predict,
        "grpc": lambda x: client.classify(list(x), top_k=1),
    }
    print(f"full network width {args.width}, {args.threads} threads per path; p50 / p90 in ms over {args.requests} requests")
    print(f"{'batch':>5}  " + "  ".join(f"{name:>17}" for name in paths) + "   engine/in-process  grpc/in-process")
    for batch in sizes:
        x = torch.randn(batch, 3, 227, 227)
        times = {name: [] for name in paths}
        for i in range(args.requests + 3):
            for name, run in paths.items():
                start = time.perf_counter()
                run(x)
                if i >= 3:  # warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
        p50 = {name: statistics.median(t) for name, t in times.items()}
        cells = "  ".join(f"{p50[name]:8.1f} / {percentile(t, 0.9):6.1f}" for name, t in times.items())
        print(f"{batch:>5}  {cells}   {p50['engine'] / p50['in-process']:17.2f}  {p50['grpc'] / p50['in-process']:15.2f}")
    client.close()
    server.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
