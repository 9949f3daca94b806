"""The gRPC service end to end: a real server on a free loopback port, a real client, real images."""

import io
import math
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from coordinator.service.requests import TrainingRequest
from coordinator.service.serving_policy import ServingShare
from towers.figures import figure3_layout

WIDTH = 0.25  # the served network and the jobs' networks share it, so publishing never rebuilds towers
TINY = {"width": str(WIDTH), "epochs": "2", "batch_size": "8", "publish_every": "2"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "patterns", train_per_class=6, val_per_class=2)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    roots = [str(tmp_path_factory.getbasetemp())]  # every test's files are under it
    # Serving without a share of its own: a test below times classification against a training step.
    srv = Server(
        ServeOptions(
            port=0,
            metrics_port=0,
            width=WIDTH,
            max_batch=16,
            max_delay_ms=2,
            data_roots=roots,
            checkpoint_roots=roots,
            serving_share=1.0,
        )
    ).start()
    with AlexNetClient(f"127.0.0.1:{srv.port}", timeout=60) as first:
        first.wait_ready()  # the answer before any job has trained, whichever test runs first
        srv.first_answer = first.classify([jpeg_bytes()], top_k=3)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with AlexNetClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        c.wait_ready()
        yield c


def jpeg_bytes(seed=0, file_format="JPEG"):
    """A 300x260 image of noise, encoded (JPEG unless told otherwise)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(buffer, file_format)
    return buffer.getvalue()


def wait_for(predicate, timeout=120, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def finish(client, job_id):
    return wait_for(lambda: (j := client.get(job_id)).state in (pb.FINISHED, pb.STOPPED, pb.FAILED) and j)


def scrape_families(server) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return list(text_string_to_metric_families(text))


def scrape(server) -> dict:
    samples = {}
    for family in scrape_families(server):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def total(samples, name):
    return sum(v for (n, _), v in samples.items() if n == name)


def test_health_is_serving_and_reflection_lists_the_api(client):
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for service in ("", "alexnet.v1.InferenceService", "alexnet.v1.TrainingService", "alexnet.v1.ModelService"):
        response = client.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {"alexnet.v1.TrainingService", "alexnet.v1.InferenceService", "alexnet.v1.ModelService"} <= services
    assert "grpc.health.v1.Health" in services
    # The schema itself travels: a reflection client can build requests without proto files.
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(database)
    method = pool.FindServiceByName("alexnet.v1.InferenceService").FindMethodByName("Classify")
    assert method.input_type.full_name == "alexnet.v1.ClassifyRequest"
    assert [f.name for f in method.input_type.fields] == ["images", "top_k"]


def test_before_training_classification_says_it_uses_initial_weights(server):
    response = server.first_answer
    assert response.model_version == 0
    assert "initial weights" in response.model_note
    [result] = response.results
    assert len(result.top) == 3
    assert result.top[0].probability >= result.top[1].probability >= result.top[2].probability
    assert all(p.label for p in result.top)


def test_model_info_shows_the_table_the_towers_and_the_classes(client):
    info = client.info()
    assert [layer.name for layer in info.layers] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert [layer.sees for layer in info.layers][:3] == ["image", "own", "both"]
    conv1 = info.layers[0]
    assert conv1.outputs == sum(conv1.outputs_per_tower) and len(conv1.outputs_per_tower) == 2
    assert any(op.startswith("LRN(") for op in conv1.then)
    assert [t.index for t in info.towers] == [0, 1]
    assert all(t.device == "cpu" for t in info.towers)
    assert sum(t.parameters for t in info.towers) == info.parameters
    assert len(info.classes) == 10 and info.image_size == 227
    assert info.transport == "shared memory"  # "auto" for towers on one host


def test_tensor_input_matches_the_same_image_encoded(client):
    """A raw [3,227,227] tensor is taken as the network input; both paths give probabilities summing to 1."""
    tensor = np.random.default_rng(1).normal(size=(3, 227, 227)).astype(np.float32)
    response = client.classify([tensor, jpeg_bytes(2)], top_k=10)
    assert len(response.results) == 2
    for result in response.results:
        assert sum(p.probability for p in result.top) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "images, top_k, message",
    [
        ([], 5, "no images"),
        ([b"this is not an image"], 5, "image 0 cannot be decoded"),
        ([np.zeros((3, 64, 64), np.float32)], 5, r"tensor shape is \[3, 64, 64\], it must be \[3, 227, 227\]"),
        ([pb.Image(tensor=pb.Tensor(shape=[3, 227, 227], data=b"\0" * 12))], 5, "tensor data holds 12 bytes"),
        ([np.full((3, 227, 227), np.nan, np.float32)], 5, "NaN"),
        ([pb.Image()], 5, "image 0 is empty"),
        (["jpeg"], 0, "top_k must be between 1 and 10"),
        (["jpeg"], -1, "top_k must be between 1 and 10"),
        (["jpeg"], 11, "top_k must be between 1 and 10"),
        (["jpeg"] * 17, 5, "at most 16"),
    ],
)
def test_bad_classify_requests_get_invalid_argument(client, images, top_k, message):
    images = [jpeg_bytes() if isinstance(i, str) else i for i in images]
    with pytest.raises(grpc.RpcError) as caught:
        client.classify(images, top_k=top_k)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() and re.search(message, caught.value.details())


@pytest.mark.parametrize("call", ["get", "stop", "watch"])
def test_unknown_and_empty_jobs(client, call):
    for job_id, code in (("nope", grpc.StatusCode.NOT_FOUND), ("", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as caught:
            result = getattr(client, call)(job_id)
            list(result) if call == "watch" else result
        assert caught.value.code() == code
        assert "ListTrainings" in caught.value.details() or "job_id is empty" in caught.value.details()


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(), "no dataset"),
        (dict(data_dir="MISSING"), "does not exist"),
        (dict(data_dir="EMPTY"), "no class folders"),
        (dict(data_dir="DATA", preset="fast"), "unknown preset 'fast'"),
        (dict(data_dir="DATA", overrides={"lr": "-1"}), "lr must be"),
        (dict(data_dir="DATA", overrides={"batch_size": "0"}), "batch_size must be at least 1"),
        (dict(data_dir="DATA", overrides={"epochs": "many"}), "epochs='many' is not a valid int"),
        (dict(data_dir="DATA", overrides={"learning_rate": "0.1"}), "unknown override learning_rate"),
        (dict(data_dir="DATA", overrides={"transport": "pigeon"}), "transport must be one of auto, gloo, nccl"),
        (
            dict(data_dir="DATA", overrides={"batch_size": "8", "replicas": "3"}),
            "batch_size (8) must be a multiple of replicas (3)",
        ),
    ],
)
def test_bad_training_specs_get_invalid_argument(client, dataset, tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    folders = {
        "DATA": str(dataset / "train"),
        "EMPTY": str(tmp_path / "empty"),
        "MISSING": str(tmp_path / "no-such-folder"),
    }
    if "data_dir" in spec:
        spec["data_dir"] = folders.get(spec["data_dir"], spec["data_dir"])
    request = pb.TrainingSpec(**{k: v for k, v in spec.items()})
    with pytest.raises(grpc.RpcError) as caught:
        client.training.StartTraining(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_full_lifecycle_watch_to_the_end(client, server, dataset, tmp_path):
    job = client.train(str(dataset / "train"), val_dir=str(dataset / "val"), overrides=TINY, checkpoint_dir=tmp_path)
    assert job.state in (pb.PENDING, pb.RUNNING) and job.job_id
    events = list(client.watch(job.job_id))
    kinds = [e.kind for e in events]
    assert events[0].kind == pb.TrainingEvent.STATE  # the current state comes first
    assert events[-1].kind == pb.TrainingEvent.STATE and events[-1].state == pb.FINISHED
    steps = [e.progress.step for e in events if e.kind == pb.TrainingEvent.STEP]
    assert steps == sorted(steps) and steps[-1] == 16  # 2 epochs x 60 images / batch 8
    epochs = [e for e in events if e.kind == pb.TrainingEvent.EPOCH]
    assert [e.progress.epoch for e in epochs] == [1, 2]
    assert all(0 <= e.progress.top1_accuracy <= e.progress.top5_accuracy <= 1 for e in epochs)
    published = [e.model_version for e in events if e.kind == pb.TrainingEvent.PUBLISHED]
    assert len(published) >= 8 and published == sorted(published)
    assert pb.TrainingEvent.PUBLISHED in kinds and not math.isnan(events[-1].progress.loss)
    final = client.get(job.job_id)
    assert final.state == pb.FINISHED and final.ended_unix >= final.created_unix
    assert final.model_version == published[-1]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [
        "checkpoint-step0000008.pt",
        "checkpoint-step0000016.pt",
    ]
    # The served model is now this job's last version, and says so.
    response = client.classify([jpeg_bytes()], top_k=2)
    assert response.model_version == final.model_version
    assert response.model_note.startswith("trained")
    # Its TensorBoard log is in a folder of its own under the server's log root.
    assert Path(final.log_dir) == Path(os.environ["ALEXNET_MP_LOGS"]) / job.job_id
    assert list(Path(final.log_dir).glob("events.out.tfevents.*"))
    # Figure 3 of its last checkpoint and of the version it published last: the same weights, the same picture.
    from_job, served = client.kernels(job.job_id), client.kernels()
    assert from_job.png == served.png and served.model_version == final.model_version and from_job.model_version == 0
    assert "checkpoint at step 16" in from_job.source and list(served.kernels_per_tower) == [12, 12]
    gauge = [scrape(server)[("alexnet_conv1_colour_specialisation", (("tower", str(t)),))] for t in range(2)]
    assert gauge == pytest.approx(list(served.colour_specialisation)) == list(from_job.colour_specialisation)
    assert client.list()[0].job_id == job.job_id
    # A late watcher of an ended job gets its final state at once.
    [late] = list(client.watch(job.job_id))
    assert late.state == pb.FINISHED and late.progress.step == 16


def test_one_job_at_a_time_stop_and_list(client, server, dataset, tmp_path):
    long = dict(TINY, epochs="500", replicas="2")  # two data-parallel groups, 4 images each
    first = client.train(str(dataset / "train"), overrides=long, checkpoint_dir=tmp_path)
    wait_for(lambda: client.get(first.job_id).progress.step >= 2)
    info = client.info()  # the serving pair, and the job's two groups of two towers
    assert [(t.replica, t.index) for t in info.towers] == [(0, 0), (0, 1)]
    assert info.training_replicas == 2
    assert [(t.replica, t.index) for t in info.training_towers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(t.node and t.host and t.device == "cpu" for t in info.training_towers)
    allreduced = {
        dict(labels)["replica"]: value
        for (name, labels), value in scrape(server).items()
        if name == "alexnet_allreduce_bytes_total" and dict(labels)["tower"] == "1"
    }
    assert set(allreduced) == {"0", "1"} and min(allreduced.values()) > 0
    with pytest.raises(grpc.RpcError) as caught:
        client.train(str(dataset / "train"), overrides=TINY)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first.job_id in caught.value.details() and "StopTraining" in caught.value.details()
    stopping = client.stop(first.job_id)
    assert stopping.state in (pb.STOPPING, pb.STOPPED)
    stopped = finish(client, first.job_id)
    assert stopped.state == pb.STOPPED
    assert not client.info().training_towers and client.info().training_replicas == 0
    assert list(tmp_path.glob("checkpoint-*.pt"))  # the stop wrote a checkpoint: nothing is lost
    assert (tmp_path / "latest.pt").exists()
    listed = client.list()
    assert listed[0].job_id == first.job_id
    assert [j.created_unix for j in listed] == sorted((j.created_unix for j in listed), reverse=True)
    again = client.stop(first.job_id)  # stopping an ended job is harmless
    assert again.state == pb.STOPPED


def test_classify_during_training_never_waits_a_step_and_metrics_grow(client, server, dataset):
    heavy = dict(TINY, epochs="500", batch_size="32", publish_every="1")
    job = client.train(str(dataset / "train"), overrides=heavy)
    events = client.watch(job.job_id)
    step_times, stop_watching = [], threading.Event()

    def watch():
        last = None
        for event in events:
            if event.kind == pb.TrainingEvent.STEP:
                if last is not None:
                    step_times.append(event.progress.elapsed_seconds - last)
                last = event.progress.elapsed_seconds
            if stop_watching.is_set():
                break

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(lambda: len(step_times) >= 3)
    before = scrape(server)
    latencies, versions = [], []
    image = jpeg_bytes(5)
    while len(latencies) < 40:
        start = time.perf_counter()
        response = client.classify([image], top_k=1)
        latencies.append(time.perf_counter() - start)
        versions.append(response.model_version)
    after = scrape(server)
    client.stop(job.job_id)
    stop_watching.set()
    finish(client, job.job_id)
    events.cancel()
    step = float(np.median(step_times))
    assert max(latencies) < step, f"classify took {max(latencies):.3f} s while a step takes {step:.3f} s"
    assert versions == sorted(versions) and versions[-1] > versions[0]  # new versions arrived meanwhile
    # Training counters grew between two scrapes taken while it ran.
    assert total(after, "alexnet_training_steps_total") > total(before, "alexnet_training_steps_total")
    assert total(after, "alexnet_training_samples_total") > total(before, "alexnet_training_samples_total")
    assert total(after, "alexnet_exchange_bytes_total") > total(before, "alexnet_exchange_bytes_total")


def test_the_serving_share_lends_a_burst_then_rests_serving_only_while_a_job_trains():
    training = [False]
    share = ServingShare(0.25, training=lambda: training[0], burst=0.5)
    share.spent(5.0)
    assert share.rest() == 0.0  # no job: serving has the whole machine, and nothing is counted
    training[0] = True
    share.spent(0.2)
    assert share.rest() == 0.0  # within the burst: a light load never waits
    share.spent(1.3)  # 1.0 s beyond the bucket: 4 s at a quarter of the time
    assert 3.9 < share.rest() <= 4.0
    training[0] = False
    assert share.rest() == 0.0  # the job ended: no more waiting
    whole = ServingShare(1.0, training=lambda: True)
    whole.spent(5.0)
    assert whole.rest() == 0.0
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="the serving share must be in"):
            ServingShare(bad)


def test_while_a_job_trains_a_request_after_a_batch_waits_out_its_share(client, server):
    """The batcher keeps to the share: the next batch starts once the rest after the last one is over."""
    kept = server.classifier.share
    server.classifier.share = ServingShare(0.1, training=lambda: True, burst=0.0)
    try:
        client.classify([jpeg_bytes(1)], top_k=1)
        rest = server.classifier.share.rest()
        assert rest > 0
        start = time.perf_counter()
        client.classify([jpeg_bytes(2)], top_k=1)
        assert time.perf_counter() - start >= rest - 0.01  # it waited, then ran
    finally:
        server.classifier.share = kept


# Metrics that read 0 after the activity of the test below, and why. They are still checked to be
# exported, with their help text.
RESTING_METRICS = {
    "alexnet_training_running": "0 once the job has ended (tests/test_observability.py reads it while one runs)",
    "alexnet_training_skipped_images": "0 while every image decodes (the generated dataset has no broken file)",
    "alexnet_classify_pending_requests": "0 once every request has been answered: the queue is empty",
    "alexnet_classify_pending_images": "0 once every request has been answered: the queue is empty",
    "alexnet_tower_restarts_total": "0 unless a tower died (tests/test_recovery.py kills one)",
    "alexnet_recovery_seconds_total": "0 unless a tower died",
    "alexnet_validation_top1_accuracy": "may be 0 after one epoch of a tiny network (checked to lie in [0, 1])",
}
# The sample that shows a metric was observed: a counter's total, a histogram's count, a gauge's value.
# prometheus_client names a counter's family without the `_total` that its sample (and the README) carries.
OBSERVED_SAMPLE = {"counter": "_total", "histogram": "_count", "gauge": ""}


def observed(samples, family) -> bool:
    """Whether any series of the metric holds a value other than 0 (or NaN, a gauge never set)."""
    sample = family.name + OBSERVED_SAMPLE[family.type]
    return any(value != 0 and math.isfinite(value) for (name, _), value in samples.items() if name == sample)


def test_one_scrape_shows_every_metric(client, server, dataset):
    """Every metric of the service's registry is exported with its help text, and observed."""
    two_groups = dict(TINY, epochs="1", replicas="2")  # the all-reduce metrics need data-parallel groups
    finish(client, client.train(str(dataset / "train"), overrides=two_groups).job_id)
    client.classify([jpeg_bytes()], top_k=1)
    with pytest.raises(grpc.RpcError):
        client.classify([jpeg_bytes()], top_k=0)
    with pytest.raises(grpc.RpcError):
        client.get("no-such-job")
    registered = {family.name: family for family in server.metrics.registry.collect()}
    exported = {family.name: family for family in scrape_families(server)}
    # Nothing exported that the registry does not hold, but the endpoint's own age of the snapshot.
    assert {name for name in exported if not name.endswith("_created")} == set(registered) | {
        "alexnet_metrics_snapshot_age_seconds"
    }
    for name, family in registered.items():
        assert family.documentation and exported[name].documentation == family.documentation, name
        assert exported[name].type == family.type, name
    samples = scrape(server)
    shown = {name + ("_total" if family.type == "counter" else ""): family for name, family in registered.items()}
    assert set(RESTING_METRICS) <= set(shown)
    unobserved = [name for name, family in shown.items() if not observed(samples, family)]
    assert [name for name in unobserved if name not in RESTING_METRICS] == []
    assert 0 <= samples[("alexnet_validation_top1_accuracy", ())] <= 1
    labels = {dict(labels_of)["tower"] for n, labels_of in samples if n == "alexnet_tower_compute_seconds_total"}
    assert labels == {"0", "1"}  # within each replica group, whatever the number of groups
    replicas = {dict(labels_of)["replica"] for n, labels_of in samples if n == "alexnet_tower_compute_seconds_total"}
    assert "0" in replicas
    points = {
        (dict(labels_of)["point"], dict(labels_of)["direction"])
        for n, labels_of in samples
        if n == "alexnet_exchange_bytes_total"
    }
    # The four exchange points, and the logits' all-gather (forward only: its backward needs no exchange).
    assert points == {(p, d) for p in ("conv3", "fc6", "fc7", "fc8") for d in ("forward", "backward")} | {
        ("logits", "forward")
    }
    codes = {dict(labels_of)["code"] for n, labels_of in samples if n == "alexnet_classify_requests_total"}
    assert {"OK", "INVALID_ARGUMENT"} <= codes
    handled = {
        (dict(labels_of)["method"], dict(labels_of)["code"])
        for n, labels_of in samples
        if n == "alexnet_grpc_server_handled_total"
    }
    assert ("/alexnet.v1.InferenceService/Classify", "OK") in handled
    assert ("/alexnet.v1.TrainingService/GetTraining", "NOT_FOUND") in handled
    assert samples[("alexnet_model_version", ())] >= 1


def test_classify_and_model_info_name_the_same_version(client):
    response = client.classify([jpeg_bytes(9), jpeg_bytes(10)], top_k=5)
    assert len(response.results) == 2 and all(len(r.top) == 5 for r in response.results)
    assert client.info().model_version == response.model_version


# --- the CLI, against the same server ------------------------------------------------------------
def run_cli(server, capsys, *argv):
    from client.cli import console, main

    console.width = 160  # a terminal's width; captured output has none
    code = main(["--target", f"127.0.0.1:{server.port}", *argv])
    return code, capsys.readouterr().out


def test_cli_kernels_writes_figure3_of_the_served_version(server, client, capsys, tmp_path):
    output = tmp_path / "figure3.png"
    code, out = run_cli(server, capsys, "kernels", "-o", str(output))
    layout = figure3_layout([12, 12], 11)  # width 0.25: 12 kernels of 11x11 per tower
    assert code == 0 and Image.open(output).size == (layout.width, layout.height)
    assert "tower 0 (12 kernels): colour specialisation" in out and "tower 1 (12 kernels)" in out
    code, out = run_cli(server, capsys, "kernels", "no-such-job")
    assert code == 1 and "NOT_FOUND" in out and "no training job 'no-such-job'" in out
    code, out = run_cli(server, capsys, "kernels", "--version", "999999")
    assert code == 1 and "NOT_FOUND" in out and "model version 999999 is not served now" in out
    code, out = run_cli(server, capsys, "kernels", "some-job", "--version", "1")
    assert code == 2 and "not both" in out


def test_cli_info_and_classify_print_readable_tables(server, client, capsys, tmp_path):
    code, out = run_cli(server, capsys, "info")
    assert code == 0 and "conv1" in out and "fc8" in out and "tower" in out and "model version" in out
    assert "exchanges over shared memory" in out
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(3))
    code, out = run_cli(server, capsys, "classify", str(image), "--top-k", "3")
    assert code == 0 and "photo.jpg" in out and "probability" in out
    assert out.count("%") == 3  # three ranked classes for one image
    code, out = run_cli(server, capsys, "classify", str(tmp_path / "missing.jpg"))
    assert code == 2 and "no such file" in out
    with pytest.raises(SystemExit, match="--transport: unknown transport 'pigeon': choose one of auto, gloo, nccl"):
        run_cli(server, capsys, "serve", "--port", "0", "--transport", "pigeon")  # refused before anything starts


def test_cli_train_follow_status_and_errors(server, client, capsys, dataset):
    code, out = run_cli(
        server,
        capsys,
        "train",
        "--data",
        str(dataset / "train"),
        "--set",
        "width=0.25",
        "--set",
        "epochs=1",
        "--set",
        "batch_size=8",
        "--follow",
    )
    assert code == 0 and "started job" in out and "FINISHED" in out and "validation top-1" in out
    job_id = re.search(r"started job (\w+)", out).group(1)
    code, out = run_cli(server, capsys, "status", job_id)
    assert code == 0 and f"TensorBoard log: {Path(os.environ['ALEXNET_MP_LOGS']) / job_id}" in out
    code, out = run_cli(server, capsys, "kernels", job_id)
    assert code == 1 and "FAILED_PRECONDITION" in out and "has written no checkpoint" in out
    code, out = run_cli(server, capsys, "status")
    assert code == 0 and "FINISHED" in out
    code, out = run_cli(server, capsys, "train", "--data", str(dataset / "no-such-dir"))
    assert code == 1 and "INVALID_ARGUMENT" in out and "does not exist" in out
    code, out = run_cli(server, capsys, "train", "--data", "/etc")
    assert code == 1 and "PERMISSION_DENIED" in out and "data_dir /etc is outside the server's data roots" in out
    code, out = run_cli(server, capsys, "train", "--builtin", "--set", "lr")
    assert code == 2 and "NAME=VALUE" in out
    code, out = run_cli(server, capsys, "train")
    assert code == 2 and "--data DIR, --builtin, or --resume JOB|CHECKPOINT" in out
    code, out = run_cli(server, capsys, "train", "--resume", "/no/such/checkpoint")
    assert code == 1 and "PERMISSION_DENIED" in out and "resume_from /no/such/checkpoint is outside" in out
    code, out = run_cli(server, capsys, "train", "--resume", str(dataset / "no-checkpoint"))
    assert code == 1 and "NOT_FOUND" in out and "no checkpoint file or folder at" in out


def test_cli_says_when_no_server_listens(capsys):
    from client.cli import main

    assert main(["--target", "127.0.0.1:1", "status"]) == 1
    assert "no alexnet-mp server at 127.0.0.1:1" in capsys.readouterr().out


def test_handler_threads_keep_the_servers_priority_and_a_job_trains_at_it_whoever_asks(ray_session, dataset):
    """--serving-nice lowers the serving towers only: a handler thread lowered while it holds the
    GIL would hold back every thread of the server. And a job's thread, which drives the training
    towers, starts at the server's priority even when the thread that asked for it runs lower."""
    server = Server(ServeOptions(port=0, metrics_port=-1, serving_nice=3, data_roots=[str(dataset)]))  # not started
    mine, seen = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), {}
    handlers = server._handler_pool()
    seen["handler"] = handlers.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    handlers.shutdown()

    def lowered_caller():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, mine + 5))
        request = TrainingRequest(data_dir=str(dataset / "train"), overrides={"width": "0.125", "epochs": "1"})
        job = server.jobs.start(request)
        seen["job"] = os.getpriority(os.PRIO_PROCESS, job.thread.native_id)

    caller = threading.Thread(target=lowered_caller)
    caller.start()
    caller.join()
    server.jobs.stop_all()
    assert seen == {"handler": mine, "job": mine}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # this thread is left as it was
