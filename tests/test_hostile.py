"""Malformed and hostile requests across every RPC, each with its documented status, while a
training job runs beside them: none gets UNKNOWN or INTERNAL, the server stays SERVING, the job
goes on, and no refused request leaves anything behind."""

import contextlib
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from test_service import jpeg_bytes, wait_for
from towers import AlexNet
from towers.portable import to_safetensors

WIDTH, MAX_BATCH = 0.125, 4
INVALID, DENIED, MISSING = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels, with next to no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tensor(values) -> pb.Image:
    array = np.asarray(values, dtype="<f4")
    return pb.Image(tensor=pb.Tensor(shape=list(array.shape), data=array.tobytes()))


def pixels(fill: float) -> np.ndarray:
    return np.full((3, 227, 227), fill, dtype=np.float32)


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = generate(tmp_path_factory.mktemp("hostile") / "patterns", train_per_class=8, val_per_class=2)
    srv = Server(
        ServeOptions(
            port=0,
            metrics_port=-1,
            width=WIDTH,
            max_batch=MAX_BATCH,
            data_roots=[str(base)],
            checkpoint_roots=[str(base)],
        )
    ).start()
    with AlexNetClient(f"127.0.0.1:{srv.port}", timeout=60) as client:
        yield srv, client, root
    srv.stop()


LONG = "x" * 100_000  # a field far longer than any valid one


def cases(root, tmp):
    """(name, rpc, request or raw bytes, code, words the message must hold), by RPC."""
    val_extra = write_bad_files(tmp)
    return [
        *classify_cases(),
        *dataset_cases(root, tmp, val_extra),
        *recipe_cases(root),
        *resume_and_init_cases(root, tmp),
        *job_cases(),
        *model_cases(),
        ("unknown method", "Explode", pb.JobRef(), grpc.StatusCode.UNIMPLEMENTED, ""),
    ]


def write_bad_files(tmp):
    """Files a request may name that training must refuse; returns a val folder with a class more."""
    val_extra = generate(tmp / "val-extra", train_per_class=2, val_per_class=1) / "val"
    (val_extra / "unicorns").mkdir()
    Image.new("RGB", (8, 8)).save(val_extra / "unicorns" / "0.png")
    (tmp / "torn.pt").write_bytes(b"\x80\x02 not a checkpoint")
    other = AlexNet(num_classes=10, width=0.25)  # the requests below train the demo preset's full width
    (tmp / "narrow.safetensors").write_bytes(to_safetensors(other.state_dict(), other.config))
    (tmp / "cut.safetensors").write_bytes((tmp / "narrow.safetensors").read_bytes()[:5000])
    return val_extra


def spec_on(root):
    """A TrainingSpec maker: the generated training folder, and the fields a case sets."""
    return lambda **fields: pb.TrainingSpec(**{"data_dir": str(root / "train"), **fields})


def classify_cases():
    truncated = jpeg_bytes()[:200]
    c = lambda *images, top_k=1: pb.ClassifyRequest(images=list(images), top_k=top_k)  # noqa: E731
    return [
        ("no images", "Classify", c(), INVALID, "no images"),
        ("empty image", "Classify", c(pb.Image()), INVALID, "image 0 is empty"),
        ("garbage bytes", "Classify", c(pb.Image(encoded=b"\x00garbage" * 50)), INVALID, "cannot be decoded"),
        ("zero bytes", "Classify", c(pb.Image(encoded=b"")), INVALID, "encoded holds no bytes"),
        ("truncated JPEG", "Classify", c(pb.Image(encoded=truncated)), INVALID, "cannot be decoded"),
        ("text as image", "Classify", c(pb.Image(encoded=b"hello, world\n" * 10)), INVALID, "cannot be decoded"),
        ("decompression bomb", "Classify", c(pb.Image(encoded=png_header(13000, 13000))), INVALID, "million allowed"),
        ("huge claimed PNG", "Classify", c(pb.Image(encoded=png_header(2**31 - 1, 2))), INVALID, "cannot be decoded"),
        ("tensor shape", "Classify", c(tensor(np.zeros((3, 100, 100)))), INVALID, "must be [3, 227, 227]"),
        ("tensor scalar", "Classify", c(tensor(np.float32(1))), INVALID, "tensor shape is []"),
        (
            "tensor bytes",
            "Classify",
            c(pb.Image(tensor=pb.Tensor(shape=[3, 227, 227], data=b"\0" * 12))),
            INVALID,
            "holds 12 bytes",
        ),
        ("tensor NaN", "Classify", c(tensor(pixels(np.nan))), INVALID, "NaN or infinite"),
        ("tensor inf", "Classify", c(tensor(pixels(np.inf))), INVALID, "NaN or infinite"),
        ("tensor extreme", "Classify", c(tensor(pixels(3e38))), INVALID, "send preprocessed pixels"),
        ("top_k 0", "Classify", c(pb.Image(encoded=jpeg_bytes()), top_k=0), INVALID, "top_k must be between 1 and"),
        ("top_k negative", "Classify", c(pb.Image(encoded=jpeg_bytes()), top_k=-3), INVALID, "top_k must be"),
        ("top_k huge", "Classify", c(pb.Image(encoded=jpeg_bytes()), top_k=10**6), INVALID, "top_k must be"),
        (
            "too many images",
            "Classify",
            c(*[pb.Image(encoded=jpeg_bytes())] * (MAX_BATCH + 1)),
            INVALID,
            "split the request",
        ),
        ("not protobuf: Classify", "Classify", b"\xff\xff\xff\xff", INVALID, "not a valid Classify message"),
    ]


def dataset_cases(root, tmp, val_extra):
    """StartTraining's folders and files: missing, outside the data roots, or not what they must be."""
    train, spec = str(root / "train"), spec_on(root)
    return [
        ("no dataset", "StartTraining", pb.TrainingSpec(), INVALID, "no dataset"),
        ("NUL in path", "StartTraining", spec(data_dir=train + "\0/x"), INVALID, "NUL byte"),
        ("long path", "StartTraining", spec(data_dir="/" + LONG), DENIED, "outside the server's data roots"),
        ("long path inside", "StartTraining", spec(data_dir=str(tmp / LONG[:5000])), INVALID, "name too long"),
        ("root of the disk", "StartTraining", spec(data_dir="/"), DENIED, "outside the server's data roots"),
        ("dot-dot", "StartTraining", spec(data_dir=str(root / ".." / ".." / ".." / ".." / "etc")), DENIED, "outside"),
        ("proc", "StartTraining", spec(data_dir="/proc"), DENIED, "outside the server's data roots"),
        ("val outside", "StartTraining", spec(val_dir="/etc"), DENIED, "val_dir /etc is outside"),
        (
            "names outside",
            "StartTraining",
            spec(class_names_file="/etc/passwd"),
            DENIED,
            "class_names_file /etc/passwd",
        ),
        ("checkpoints outside", "StartTraining", spec(checkpoint_dir="/tmp-not/ckpt"), DENIED, "checkpoint_dir"),
        (
            "logs outside",
            "StartTraining",
            spec(log_dir="/etc/logs"),
            DENIED,
            "log_dir /etc/logs is outside the server's",
        ),
        ("logs in a file", "StartTraining", spec(log_dir=str(tmp / "torn.pt")), INVALID, "is not a folder"),
        ("val with a class more", "StartTraining", spec(val_dir=str(val_extra)), INVALID, "lacks: unicorns"),
        ("names missing", "StartTraining", spec(class_names_file=str(tmp / "none.txt")), INVALID, "does not exist"),
    ]


def recipe_cases(root):
    """StartTraining's preset and overrides."""
    spec = spec_on(root)
    return [
        ("unknown preset", "StartTraining", spec(preset="fast"), INVALID, "unknown preset 'fast'"),
        ("huge preset", "StartTraining", spec(preset=LONG), INVALID, "unknown preset"),
        ("unknown override", "StartTraining", spec(overrides={"learning_rate": "1"}), INVALID, "unknown override"),
        ("huge override", "StartTraining", spec(overrides={LONG: "1"}), INVALID, "unknown override"),
        ("bad value", "StartTraining", spec(overrides={"epochs": "many"}), INVALID, "is not a valid int"),
        ("NaN rate", "StartTraining", spec(overrides={"lr": "nan"}), INVALID, "lr must be a finite number"),
        ("batch of a billion", "StartTraining", spec(overrides={"batch_size": "1000000000"}), INVALID, "at most 4096"),
        ("width of a thousand", "StartTraining", spec(overrides={"width": "1000"}), INVALID, "width must be in (0, 4]"),
        ("unknown network", "StartTraining", spec(overrides={"network": "vgg"}), INVALID, "network must be one of"),
        ("bad freeze", "StartTraining", spec(overrides={"freeze": "conv1-conv9"}), INVALID, "no layer 'conv9'"),
        ("not protobuf: start", "StartTraining", b"\x0a\x05ab", INVALID, "not a valid StartTraining message"),
    ]


def resume_and_init_cases(root, tmp):
    """StartTraining from a checkpoint or a served version that is missing, torn or does not fit."""
    spec = spec_on(root)
    return [
        ("resume nothing", "StartTraining", pb.TrainingSpec(resume_from=str(tmp / "none")), MISSING, "no checkpoint"),
        ("resume torn", "StartTraining", pb.TrainingSpec(resume_from=str(tmp / "torn.pt")), INVALID, "not a readable"),
        ("resume outside", "StartTraining", pb.TrainingSpec(resume_from="/etc/passwd"), DENIED, "resume_from"),
        (
            "resume with preset",
            "StartTraining",
            pb.TrainingSpec(resume_from=str(tmp / "torn.pt"), preset="paper"),
            INVALID,
            "leave preset empty",
        ),
        (
            "init and resume",
            "StartTraining",
            spec(init_from=str(tmp / "torn.pt"), resume_from="x"),
            INVALID,
            "give one",
        ),
        ("init outside", "StartTraining", spec(init_from="/etc/passwd"), DENIED, "init_from /etc/passwd is outside"),
        ("init missing", "StartTraining", spec(init_from=str(tmp / "none.pt")), MISSING, "init_from: no checkpoint"),
        ("init torn", "StartTraining", spec(init_from=str(tmp / "torn.pt")), INVALID, "not a readable checkpoint"),
        ("init cut safetensors", "StartTraining", spec(init_from=str(tmp / "cut.safetensors")), INVALID, "truncated"),
        (
            "init of another width",
            "StartTraining",
            spec(init_from=str(tmp / "narrow.safetensors")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "conv1.weight has shape [24, 3, 11, 11], this network needs [96, 3,",
        ),
        ("init version not a number", "StartTraining", spec(init_from="version:latest"), INVALID, "version:N takes"),
        ("init version unknown", "StartTraining", spec(init_from="version:4242"), MISSING, "model version 4242 is not"),
    ]


def job_cases():
    """GetTraining, StopTraining and WatchTraining."""
    return [
        ("bad UTF-8 in a string", "GetTraining", b"\x0a\x02\xff\xfe", INVALID, "not a valid GetTraining message"),
        ("empty job id", "GetTraining", pb.JobRef(), INVALID, "job_id is empty"),
        ("unknown job", "GetTraining", pb.JobRef(job_id="nope"), MISSING, "no training job 'nope'"),
        ("huge job id", "GetTraining", pb.JobRef(job_id=LONG), MISSING, "no training job"),
        ("stop unknown", "StopTraining", pb.JobRef(job_id="nope"), MISSING, "no training job"),
        ("watch unknown", "WatchTraining", pb.JobRef(job_id="nope"), MISSING, "no training job"),
        ("watch empty", "WatchTraining", pb.JobRef(), INVALID, "job_id is empty"),
        ("watch not protobuf", "WatchTraining", b"\x0a", INVALID, "not a valid WatchTraining message"),
    ]


def model_cases():
    """ModelService: GetModelInfo, GetKernels and ExportModel."""
    return [
        ("not protobuf: model", "GetModelInfo", b"\x0a\xff", INVALID, "not a valid GetModelInfo message"),
        ("kernels: unknown job", "GetKernels", pb.GetKernelsRequest(job_id="nope"), MISSING, "no training job 'nope'"),
        ("kernels: empty job id", "GetKernels", pb.GetKernelsRequest(job_id=""), INVALID, "job_id is empty"),
        ("kernels: huge job id", "GetKernels", pb.GetKernelsRequest(job_id=LONG), MISSING, "no training job"),
        (
            "kernels: unknown version",
            "GetKernels",
            pb.GetKernelsRequest(model_version=10**12),
            MISSING,
            "model version 1000000000000 is not served now",
        ),
        (
            "kernels: negative version",
            "GetKernels",
            pb.GetKernelsRequest(model_version=-1),
            INVALID,
            "model_version must be 0 or more",
        ),
        ("kernels: not protobuf", "GetKernels", b"\x12\xff", INVALID, "not a valid GetKernels message"),
        ("export: no format", "ExportModel", pb.ExportRequest(), INVALID, "format must be ONNX"),
        ("export: unknown format", "ExportModel", pb.ExportRequest(format=99), INVALID, "format must be ONNX"),
        (
            "export: unknown job",
            "ExportModel",
            pb.ExportRequest(job_id="nope", format=pb.ONNX),
            MISSING,
            "no training job",
        ),
        (
            "export: unknown version",
            "ExportModel",
            pb.ExportRequest(model_version=77, format=pb.ONNX),
            MISSING,
            "model version 77 is not served now",
        ),
        ("export: not protobuf", "ExportModel", b"\x18\xff", INVALID, "not a valid ExportModel message"),
    ]


SERVICES = {
    "Classify": "InferenceService",
    "GetModelInfo": "ModelService",
    "GetKernels": "ModelService",
    "ExportModel": "ModelService",
    "Explode": "TrainingService",
}
STREAMS = {"WatchTraining", "ExportModel"}


def invoke(channel, method, request):
    path = f"/alexnet.v1.{SERVICES.get(method, 'TrainingService')}/{method}"
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    if method in STREAMS:
        return list(channel.unary_stream(path)(raw, timeout=30))
    return channel.unary_unary(path)(raw, timeout=30)


def test_hostile_requests_get_their_documented_status_and_change_nothing(world, tmp_path):
    srv, client, root = world
    job = client.train(root / "train", overrides={"width": "0.125", "epochs": "1000", "batch_size": "8"})
    wait_for(lambda: client.get(job.job_id).progress.step >= 2, timeout=300)
    table = cases(root, tmp_path)
    assert len(table) >= 40
    before = set(p.name for p in tmp_path.iterdir())
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    wrong = []
    for name, method, request, code, words in table:
        try:
            invoke(channel, method, request)
            got, message = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            got, message = exc.code(), exc.details() or ""
        if got != code or words not in message or len(message) > 1000:
            wrong.append(f"{name}: {got.name} {message[:200]!r}")
    channel.close()
    assert not wrong, "\n".join(wrong)

    # The server is unharmed: it serves, the job runs on, and nothing was created or started.
    health = client.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert client.classify([jpeg_bytes()], top_k=1).results[0].top[0].probability > 0
    step = client.get(job.job_id).progress.step
    wait_for(lambda: client.get(job.job_id).progress.step > step, timeout=120)
    assert [j.job_id for j in client.list()] == [job.job_id] and client.get(job.job_id).state == pb.RUNNING
    watchers = [client.watch(job.job_id) for _ in range(srv.options.max_watchers)]  # the job runs: streams stay open
    for stream in watchers:
        assert next(stream).kind == pb.TrainingEvent.STATE
    with pytest.raises(grpc.RpcError) as crowded:
        next(client.watch(job.job_id))
    assert (
        crowded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "watch streams are open" in crowded.value.details()
    )
    watchers.pop().cancel()  # a client that leaves frees its slot
    wait_for(lambda: _watch_opens(client, job.job_id), timeout=30, every=0.2)
    for stream in watchers:
        stream.cancel()
    with pytest.raises(grpc.RpcError) as busy:  # a valid request, refused while the job runs, makes no folder
        client.train(root / "train", checkpoint_dir=tmp_path / "new" / "checkpoints", log_dir=tmp_path / "new" / "logs")
    assert (
        busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "train one job at a time" in busy.value.details()
    )
    assert set(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "none").exists()
    client.stop(job.job_id)
    wait_for(lambda: client.get(job.job_id).state == pb.STOPPED, timeout=120)


def _watch_opens(client, job_id) -> bool:
    stream = client.watch(job_id)
    try:
        next(stream)
        return True
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()


@contextlib.contextmanager
def held_batches(classifier, hold: float = 2.0, max_queue: int = 2 * MAX_BATCH):
    """The real batches, each held `hold` s longer, so that requests pile up behind them; yields the list
    of batch sizes (in requests) as they start. By default the queue holds two full requests, below
    what the handler threads could queue."""
    started, real_run = [], classifier._run

    def slow_run(batch):
        started.append(len(batch))
        time.sleep(hold)
        real_run(batch)

    classifier._run, classifier.max_queue = slow_run, max_queue
    try:
        yield started
    finally:
        classifier._run, classifier.max_queue = real_run, 256


def test_the_classify_queue_is_bounded_and_an_expired_request_is_not_computed(world):
    srv, client, _ = world
    image = pb.Image(encoded=jpeg_bytes())
    with held_batches(srv.classifier) as started:
        with AlexNetClient(f"127.0.0.1:{srv.port}") as c:
            futures = [
                c.inference.Classify.future(pb.ClassifyRequest(images=[image] * MAX_BATCH, top_k=1), timeout=30)
                for _ in range(6)
            ]
            codes = []
            for future in futures:
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert "the classify queue is full" in exc.details()
            # Two requests fill the queue; a third is accepted only if the batcher took the first out of it in time.
            assert codes.count("OK") in (2, 3) and codes.count("RESOURCE_EXHAUSTED") == 6 - codes.count("OK")
            computed = len(started)
            blocker = c.inference.Classify.future(pb.ClassifyRequest(images=[image], top_k=1), timeout=30)
            wait_for(lambda: len(started) == computed + 1, timeout=10, every=0.01)  # the blocker's batch is running
            with pytest.raises(grpc.RpcError) as late:  # 50 ms: expires in the queue behind the 2 s batch
                c.inference.Classify(pb.ClassifyRequest(images=[image], top_k=1), timeout=0.05)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            blocker.result()
            time.sleep(2.5)
            assert len(started) == computed + 1  # the blocker alone: the expired request was never computed


def test_clients_that_cancel_free_their_places_in_the_queue_and_are_not_computed(world):
    srv, _, _ = world
    full = pb.ClassifyRequest(images=[pb.Image(encoded=jpeg_bytes())] * MAX_BATCH, top_k=1)
    with held_batches(srv.classifier, hold=4.0) as started, AlexNetClient(f"127.0.0.1:{srv.port}") as c:
        blocker = c.inference.Classify.future(full, timeout=60)
        wait_for(lambda: len(started) == 1, timeout=10, every=0.01)  # its batch runs for 4 s
        queued = [c.inference.Classify.future(full, timeout=30) for _ in range(2)]  # the queue is full now
        wait_for(lambda: srv.classifier._queue and len(srv.classifier._queue) == 2, timeout=5, every=0.01)
        with pytest.raises(grpc.RpcError) as refused:
            c.inference.Classify(full, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for future in queued:
            future.cancel()
        # Within a second the handler threads see their clients gone and give up the places.
        wait_for(lambda: not srv.classifier._queue, timeout=5, every=0.05)
        after = [c.inference.Classify.future(full, timeout=60) for _ in range(2)]
        assert [len(f.result().results) for f in [blocker, *after]] == [MAX_BATCH] * 3
        assert started == [1, 1, 1]  # batches of one request: the blocker and the two after it, never the cancelled


def test_rpcs_beyond_the_concurrency_limit_are_refused_and_the_server_recovers_when_they_go(world):
    srv, client, _ = world
    one = pb.ClassifyRequest(images=[pb.Image(encoded=jpeg_bytes())], top_k=1)
    limit = srv.options.threads * 4
    with held_batches(srv.classifier, hold=10.0, max_queue=10 * limit), AlexNetClient(f"127.0.0.1:{srv.port}") as c:
        calls = [c.inference.Classify.future(one, timeout=60) for _ in range(limit + 12)]
        wait_for(lambda: sum(call.done() for call in calls) >= 12, timeout=10, every=0.05)
        time.sleep(1.0)  # any more refusals come in meanwhile
        done = [call for call in calls if call.done()]
        assert done and all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in done)
        assert all("Concurrent RPC limit" in call.details() for call in done)
        assert len(done) == 12, len(done)  # the overflow, exactly: none of the others has an answer yet
        for call in calls:
            call.cancel()
        # The handler threads see their clients gone within a second; the server answers again.
        wait_for(lambda: not srv.classifier._queue, timeout=15, every=0.1)
    assert len(client.classify([jpeg_bytes()], top_k=1).results) == 1
