"""alexnet-mp: serve, train, watch, classify and inspect the two-tower AlexNet.

    alexnet-mp serve [--ray-address ADDR] [--host 127.0.0.1] [--port 50051] [--metrics-port 9464]
    alexnet-mp train --data DIR [--preset demo|paper] [--set lr=0.005] [--set snapshot_every=50] [--follow]
    alexnet-mp train --builtin --follow
    alexnet-mp train --resume JOB|CHECKPOINT [--set epochs=20] [--follow]
    alexnet-mp status [JOB]        alexnet-mp watch JOB        alexnet-mp stop JOB
    alexnet-mp classify IMAGE... [--top-k 5]
    alexnet-mp info
    alexnet-mp kernels [JOB | --version N] [-o figure3.png]   # the paper's Figure 3 for a model
    alexnet-mp export [JOB | --version N | CHECKPOINT] --format onnx|torch-export|safetensors -o FILE
    alexnet-mp demo                # everything above on one machine, on the built-in dataset

Client commands talk to --target (default $ALEXNET_MP_TARGET or 127.0.0.1:50051).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grpc

from alexnet_api.v1 import alexnet_pb2 as pb
from client import DEFAULT_TARGET, AlexNetClient, read_token
from client.demo import demo_precision, run_demo
from client.views import STATE, colour_lines, console, follow, jobs_table, predictions_table, show_model
from coordinator.training.recipe import PRESETS  # torch-free and Ray-free, as a client command must stay


def overrides(args) -> dict:
    """--set NAME=VALUE items as a dict (main() has refused any without '=')."""
    return dict(item.split("=", 1) for item in args.set)


# --- client commands -----------------------------------------------------------------------------
def connect(args) -> AlexNetClient:
    """A client for --target, with the token and TLS files the global options name."""
    return AlexNetClient(
        args.target,
        token=read_token(args.token_file),
        tls_ca=args.tls_ca,
        tls_cert=args.client_cert,
        tls_key=args.client_key,
    )


def cmd_train(args) -> int:
    if not (args.data or args.builtin or args.resume):
        console.print("[red]say what to train on: --data DIR, --builtin, or --resume JOB|CHECKPOINT")
        return 2
    with connect(args) as client:
        job = client.train(
            args.data,
            builtin=args.builtin,
            val_dir=args.val or "",
            class_names_file=args.classes or "",
            preset=args.preset or ("" if args.resume else "demo"),
            overrides=overrides(args),
            checkpoint_dir=args.checkpoint_dir or "",
            resume_from=args.resume or "",
            log_dir=args.log_dir or "",
            init_from=args.init_from or "",
        )
        console.print(f"started job [bold]{job.job_id}[/] ({STATE(job.state)})")
        if args.follow:
            return 0 if follow(client, job.job_id).state in (pb.FINISHED, pb.STOPPED) else 1
    return 0


def cmd_watch(args) -> int:
    with connect(args) as client:
        return 0 if follow(client, args.job).state in (pb.FINISHED, pb.STOPPED) else 1


def cmd_status(args) -> int:
    with connect(args) as client:
        jobs = [client.get(args.job)] if args.job else client.list()
        if not jobs:
            console.print("no training jobs yet: start one with `alexnet-mp train`")
        else:
            console.print(jobs_table(jobs))
        if args.job and jobs[0].log_dir:
            console.print(f"TensorBoard log: {jobs[0].log_dir}", highlight=False)
        if args.job and jobs[0].checkpoint:
            console.print(f"latest checkpoint: {jobs[0].checkpoint}", highlight=False)
    return 0


def cmd_stop(args) -> int:
    with connect(args) as client:
        job = client.stop(args.job)
        console.print(f"job {job.job_id}: {STATE(job.state)}")
    return 0


def cmd_classify(args) -> int:
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        console.print(f"[red]no such file: {', '.join(missing)}")
        return 2
    with connect(args) as client:
        response = client.classify(args.images, top_k=args.top_k)
    console.print(predictions_table(args.images, response))
    return 0


def cmd_info(args) -> int:
    with connect(args) as client:
        show_model(client.info())
    return 0


def cmd_export(args) -> int:
    if args.source and args.version is not None:
        console.print("[red]name a job, a checkpoint or a --version, not more than one")
        return 2
    if args.source and Path(args.source).exists():  # a checkpoint file or folder here: no server needed
        from client.local import export_checkpoint

        size, source = export_checkpoint(args.source, args.format, args.output)
    else:
        with connect(args) as client:
            last = client.export(args.output, args.format, args.source, args.version)
        size, source = last.total_bytes, last.source
    console.print(f"{args.output}: {args.format}, {size / 1e6:.1f} MB, {source}", highlight=False)
    return 0


def cmd_kernels(args) -> int:
    if args.job and args.version is not None:
        console.print("[red]name a job or a --version, not both")
        return 2
    with connect(args) as client:
        figure = client.kernels(args.job, args.version)
    Path(args.output).write_bytes(figure.png)
    console.print(f"{args.output}: {figure.width}x{figure.height} pixels, {figure.source}")
    console.print(colour_lines(figure))
    return 0


# --- server commands -----------------------------------------------------------------------------
def state_dir(args):
    """serve's --state-dir: its default when not given, None when given empty (demo keeps nothing)."""
    from coordinator.service.state import default_state_dir

    if not hasattr(args, "state_dir"):
        return None
    return str(default_state_dir()) if args.state_dir is None else (args.state_dir or None)


def serve_options(args):
    from coordinator.engine.links import check_transport
    from coordinator.service import ServeOptions
    from towers.precision import check_precision

    for option, check in (("--transport", check_transport), ("--precision", check_precision)):
        try:
            check(getattr(args, option[2:]))
        except ValueError as error:
            raise SystemExit(f"alexnet-mp: {option}: {error}") from None
    return ServeOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        ray_address=args.ray_address,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        serving_share=args.serving_share,
        serving_nice=args.serving_nice,
        width=args.width,
        transport=args.transport,
        precision=args.precision,
        state_dir=state_dir(args),
        **{name: getattr(args, name, None) for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca")},
        insecure_no_auth=getattr(args, "insecure_no_auth", False),
        data_roots=getattr(args, "data_roots", None),
        checkpoint_roots=getattr(args, "checkpoint_roots", None),
        keep_versions=getattr(args, "keep_versions", 5),
        log_root=getattr(args, "log_root", None),
        max_exports=getattr(args, "max_exports", 2),
        pinned_versions=tuple(getattr(args, "pinned_versions", ())),
    )


def cmd_serve(args) -> int:
    from coordinator.engine.allocator import return_freed_memory
    from coordinator.service import SecurityError, Server

    return_freed_memory()  # before any thread starts: a long-running server's heap stays its size under load
    try:
        server = Server(serve_options(args)).start()
    except SecurityError as error:
        console.print(f"[red]alexnet-mp serve: {error}")
        return 2
    console.print(
        f"alexnet-mp serving gRPC on {args.host}:{server.port}"
        + (f", metrics at http://{args.host}:{server.metrics_port}/metrics" if server.metrics_port else "")
        + "  (Ctrl-C stops; a running job stops at a step boundary)"
    )
    logs = server.options.log_folder()
    console.print(f"jobs' TensorBoard logs: {logs} (tensorboard --logdir {logs})", highlight=False)
    server.wait()
    return 0


def cmd_demo(args) -> int:
    args.precision = demo_precision(args.precision)
    return run_demo(serve_options(args), args.preset, {"precision": args.precision, **overrides(args)})


def share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share is above 0 and at most 1, got {text}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    parser.add_argument("--ray-address", help="join this Ray cluster ('auto' on a cluster node); default: start one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="Prometheus /metrics port (-1: none)")
    parser.add_argument("--max-batch", type=int, default=32, help="images per served batch")
    parser.add_argument(
        "--max-delay-ms", type=float, default=1.0, help="how long a lone request waits for a batch to fill"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="images waiting to be classified, at most (beyond: RESOURCE_EXHAUSTED)",
    )
    parser.add_argument(
        "--serving-share",
        type=share,
        default=0.25,
        metavar="(0-1]",
        help="while a job trains, classification computes at most this share of the time: a light "
        "load is answered at once, a heavy one waits in batches and training keeps the rest "
        "(default 0.25; 1: no limit)",
    )
    parser.add_argument(
        "--serving-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0-19",
        help="run the serving towers this many CPU priority steps below training (default 0: the "
        "same; a higher value slows classification under load for a little more training)",
    )
    parser.add_argument("--width", type=float, default=1.0, help="network width (1.0 is the paper's)")
    parser.add_argument(
        "--transport",
        default="auto",
        help="the backend of the serving towers' exchanges: auto (NCCL with a GPU each, else Gloo, "
        "and shared memory between towers on one host), gloo or nccl",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        help="the serving towers' arithmetic: float32, or bfloat16 (bf16 layers over float32 weights; "
        "needs AMX or AVX512-BF16 on a CPU, or a GPU with bf16)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet-mp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address for client commands")
    parser.add_argument(
        "--token-file",
        help="bearer token for client commands (default: $ALEXNET_MP_TOKEN_FILE, "
        "else $ALEXNET_MP_TOKEN); never on the command line itself",
    )
    parser.add_argument("--tls-ca", help="speak TLS to the server, trusting this CA certificate (PEM)")
    parser.add_argument("--client-cert", help="client certificate (PEM), for a server with --tls-client-ca")
    parser.add_argument("--client-key", help="the client certificate's key (PEM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_command(sub)
    add_train_command(sub)
    add_job_commands(sub)
    add_model_commands(sub)
    add_demo_command(sub)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, preset_default=None, preset_help=None) -> None:
    """--preset and --set: what a run is asked to do (coordinator.training.recipe)."""
    parser.add_argument("--preset", default=preset_default, choices=tuple(PRESETS), help=preset_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a recipe field or a run option (e.g. lr=0.005, snapshot_every=50)",
    )


def add_serve_command(sub) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server (a Ray driver)")
    add_serve_arguments(serve, 50051, 9464)
    serve.add_argument(
        "--state-dir",
        help="job records and model versions kept across restarts "
        "(default: $XDG_DATA_HOME/alexnet-mp/state, else ~/.local/share/alexnet-mp/state; '' keeps nothing)",
    )
    serve.add_argument(
        "--log-root",
        help="jobs' TensorBoard logs, a folder per job (default: $ALEXNET_MP_LOGS, "
        "else <state-dir>/tensorboard, else ~/.cache/alexnet-mp/tensorboard)",
    )
    serve.add_argument(
        "--max-exports",
        type=int,
        default=2,
        help="ExportModel calls running at once, at most "
        "(each holds copies of the weights; beyond: RESOURCE_EXHAUSTED)",
    )
    serve.add_argument("--keep-versions", type=int, default=5, help="model versions kept in the state dir")
    serve.add_argument(
        "--pin-version",
        type=int,
        action="append",
        default=[],
        dest="pinned_versions",
        metavar="N",
        help="keep version N in the state dir whatever its age (repeatable)",
    )
    add_access_arguments(serve)
    serve.set_defaults(run=cmd_serve)


def add_access_arguments(serve: argparse.ArgumentParser) -> None:
    """Who may call the server, and which folders its requests may name."""
    serve.add_argument(
        "--auth-token-file",
        help="tokens clients must send, one per line, optionally 'read:' or "
        "'train:' first (default: $ALEXNET_MP_AUTH_TOKEN_FILE; none: no authentication)",
    )
    serve.add_argument("--tls-cert", help="serve TLS with this certificate (PEM; needs --tls-key)")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM)")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument(
        "--data-root",
        action="append",
        dest="data_roots",
        metavar="DIR",
        help="a folder requests may train on (repeatable; default: your home on loopback, else none)",
    )
    serve.add_argument(
        "--checkpoint-root",
        action="append",
        dest="checkpoint_roots",
        metavar="DIR",
        help="a folder requests may checkpoint to and resume from (repeatable; default as --data-root)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without tokens (only on a network you trust)",
    )


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="start a training job")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--data", help="ImageFolder training folder (root/<class>/<image>)")
    source.add_argument("--builtin", action="store_true", help="the built-in pattern dataset")
    train.add_argument("--val", help="held-out validation folder (default: hold out a share of --data)")
    train.add_argument("--classes", help="class names file: lines like 'n01440764 tench'")
    add_run_arguments(train, preset_help="the recipe and run options (default demo; a resumed run keeps its recipe)")
    train.add_argument("--checkpoint-dir", help="write checkpoints here after every epoch")
    train.add_argument(
        "--resume",
        metavar="JOB|CHECKPOINT",
        help="go on with an earlier run exactly where it stopped: a job id, a checkpoint file, "
        "or a checkpoint folder (its latest); --set may change its run options",
    )
    train.add_argument(
        "--init-from",
        metavar="FILE|JOB|version:N",
        help="start from these weights instead of random ones (fine-tuning): a checkpoint or "
        "safetensors file, a job's latest checkpoint, or a model version; another class count "
        "starts fc8 afresh",
    )
    train.add_argument(
        "--log-dir",
        help="write the job's TensorBoard log here (default: a folder of its own "
        "under the server's --log-root; GetTraining shows it)",
    )
    train.add_argument("--follow", action="store_true", help="show a live progress bar until the job ends")
    train.set_defaults(run=cmd_train)


def add_job_commands(sub) -> None:
    watch = sub.add_parser("watch", help="follow a job's progress")
    watch.add_argument("job")
    watch.set_defaults(run=cmd_watch)

    status = sub.add_parser("status", help="list jobs, or show one")
    status.add_argument("job", nargs="?")
    status.set_defaults(run=cmd_status)

    stop = sub.add_parser("stop", help="stop a job at the next step boundary")
    stop.add_argument("job")
    stop.set_defaults(run=cmd_stop)


def add_model_commands(sub) -> None:
    classify = sub.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--top-k", type=int, default=5)
    classify.set_defaults(run=cmd_classify)

    info = sub.add_parser("info", help="the layer table, the towers and the served model")
    info.set_defaults(run=cmd_info)

    kernels = sub.add_parser("kernels", help="draw the paper's Figure 3: each tower's conv1 kernels, as a PNG")
    kernels.add_argument("job", nargs="?", help="a job: its latest checkpoint (default: the version served now)")
    kernels.add_argument("--version", type=int, help="a model version the server serves or keeps")
    kernels.add_argument("-o", "--output", default="figure3.png", help="the PNG to write (default figure3.png)")
    kernels.set_defaults(run=cmd_kernels)

    export = sub.add_parser("export", help="write a model as ONNX, a torch.export program, or safetensors")
    export.add_argument(
        "source",
        nargs="?",
        metavar="JOB|CHECKPOINT",
        help="a job (its latest checkpoint) or a checkpoint file here (default: the version served now)",
    )
    export.add_argument("--version", type=int, help="a model version the server serves or keeps")
    export.add_argument("--format", required=True, choices=("onnx", "torch-export", "safetensors"))
    export.add_argument("-o", "--output", required=True, help="the file to write")
    export.set_defaults(run=cmd_export)


def add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="start a server, train on the built-in data, classify through gRPC")
    add_serve_arguments(demo, 50051, 9464)
    add_run_arguments(demo, preset_default="demo")
    demo.set_defaults(run=cmd_demo, precision="auto")  # bfloat16 where this machine computes it, else float32


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.set if hasattr(args, "set") else False:
        bad = [item for item in args.set if "=" not in item]
        if bad:
            console.print(f"[red]--set takes NAME=VALUE, got {', '.join(bad)}")
            return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            console.print(f"[red]no alexnet-mp server at {args.target}: start one with `alexnet-mp serve`")
        else:
            console.print(f"[red]{exc.code().name}: {exc.details()}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
