"""Classification latency: in-process PyTorch, the two-tower engine, and the gRPC service, side by side.

    python benchmarks/classify.py                      # batch 1, 8 and 32, full-size network
    python benchmarks/classify.py --batches 1 --requests 200
    python benchmarks/classify.py --batches 32 --precision bfloat16   # the serving towers in bf16

For each batch size, requests rotate between the four paths (in-process, engine, gRPC, KServe),
so drift in the machine hits all alike; medians (p50) and p90 over --requests each. Same total
CPU threads: the in-process forward runs on --threads threads, each tower on --threads / 2.
  in-process  towers.AlexNet(...).eval()(x) in this process: plain PyTorch
  engine      ModelParallelAlexNet.predict(x): the serving path inside the server
  grpc        AlexNetClient.classify(tensors) to a Server on loopback: the engine plus gRPC,
              request decoding and the batcher (alexnet.v1 Classify, top 1)
  kserve      the Open Inference Protocol's ModelInfer on the same port, FP32 raw input, top 1
              through the classification extension (our generated stubs: tritonclient cannot
              share this process, see kserve.py)
Then, at batch 1, --runs more runs of the grpc and kserve paths alone: the ratio of their p50s,
per run and its median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per path and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5, help="runs of kserve against grpc at batch 1, for their ratio")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the serving towers' arithmetic; with bfloat16, in-process runs under torch.autocast",
    )
    return parser.parse_args()


def request_paths(args, server, client) -> dict:
    """The four ways to classify a batch x, by name, each with the server's weights."""
    import grpc

    from alexnet_api.inference_v2 import open_inference_grpc_pb2 as v2
    from alexnet_api.inference_v2 import open_inference_grpc_pb2_grpc as v2_rpc
    from towers import AlexNet

    engine = server.classifier.engine  # the serving pair itself
    reference = AlexNet(num_classes=engine.config.num_classes, width=args.width).eval()
    reference.load_state_dict(engine.state_dict())
    kserve = v2_rpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    top_1 = v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
    top_1.parameters["classification"].int64_param = 1

    def model_infer(x):
        tensor = v2.ModelInferRequest.InferInputTensor(name="INPUT__0", datatype="FP32", shape=list(x.shape))
        request = v2.ModelInferRequest(
            model_name="alexnet",
            inputs=[tensor],
            outputs=[top_1],
            raw_input_contents=[x.numpy().astype("<f4").tobytes()],
        )
        kserve.ModelInfer(request)

    def in_process(x):
        torch.set_num_threads(args.threads)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            reference(x)

    return {
        "in-process": in_process,
        "engine": engine.predict,
        "grpc": lambda x: client.classify(list(x), top_k=1),
        "kserve": model_infer,
    }


def timed(paths: dict, x, requests: int) -> dict:
    """Milliseconds per request of each path, rotating between them, after 3 rounds of warm-up."""
    times = {name: [] for name in paths}
    for i in range(requests + 3):
        for name, run in paths.items():
            start = time.perf_counter()
            run(x)
            if i >= 3:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def print_latencies(args, paths: dict, sizes: list[int]) -> None:
    print(
        f"full network width {args.width}, {args.precision}, {args.threads} threads per path; p50 / p90 in ms over "
        f"{args.requests} requests"
    )
    print(f"{'batch':>5}  " + "  ".join(f"{name:>17}" for name in paths) + "   engine/in-process  grpc/in-process")
    for batch in sizes:
        times = timed(paths, torch.randn(batch, 3, 227, 227), args.requests)
        p50 = {name: statistics.median(t) for name, t in times.items()}
        cells = "  ".join(f"{p50[name]:8.1f} / {percentile(t, 0.9):6.1f}" for name, t in times.items())
        print(
            f"{batch:>5}  {cells}   {p50['engine'] / p50['in-process']:17.2f}  {p50['grpc'] / p50['in-process']:15.2f}"
        )


def print_kserve_against_grpc(args, paths: dict) -> None:
    ratios = []
    for _ in range(args.runs):
        times = timed({name: paths[name] for name in ("grpc", "kserve")}, torch.randn(1, 3, 227, 227), args.requests)
        ratios.append(statistics.median(times["kserve"]) / statistics.median(times["grpc"]))
    print(
        f"batch 1, kserve.v2 ModelInfer / alexnet.v1 Classify p50: {statistics.median(ratios):.3f} "
        f"(median of {args.runs} runs: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


def main() -> None:
    args = parse_args()

    import ray

    from client import AlexNetClient
    from coordinator.service import ServeOptions, Server

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    sizes = [int(b) for b in args.batches.split(",")]
    server = Server(
        ServeOptions(port=0, metrics_port=-1, width=args.width, max_batch=max(sizes), precision=args.precision)
    ).start()
    client = AlexNetClient(f"127.0.0.1:{server.port}")
    client.wait_ready()
    paths = request_paths(args, server, client)
    print_latencies(args, paths, sizes)
    print_kserve_against_grpc(args, paths)
    client.close()
    server.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
