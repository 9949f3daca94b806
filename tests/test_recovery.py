"""Towers killed with kill -9 under a running server.

A serving tower: Classify says UNAVAILABLE and to retry, health says NOT_SERVING, and within
seconds the server serves the same model version again on new towers. A training tower: the job
replaces it, goes back to its last snapshot and finishes, counting the restart.
"""

import dataclasses
import gc
import logging
import os
import re
import signal
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from alexnet_api.v1 import alexnet_pb2 as pb
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from test_service import client, jpeg_bytes, wait_for  # noqa: F401 (client: the fixture, on this module's server)
from towers import AlexNet

WIDTH = 0.125


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    roots = [str(tmp_path_factory.getbasetemp())]
    srv = Server(
        ServeOptions(
            port=0, metrics_port=0, width=WIDTH, max_batch=8, max_delay_ms=2, data_roots=roots, checkpoint_roots=roots
        )
    ).start()
    yield srv
    srv.stop()


def health(client):
    return client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def restarts(server, role="serving") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f'alexnet_tower_restarts_total{{role="{role}"}}'):
                return float(line.split()[-1])
    raise AssertionError(f"no alexnet_tower_restarts_total series for {role}")


def tower_pids() -> set[int]:
    """Every tower actor's process on this machine, found as an operator would: by its process title."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if cmdline.read().startswith(b"ray::TowerActor"):
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_serving_tower_is_replaced_and_the_same_version_served_again(server, client):
    # Serve a version of our own, so that "the same version" means trained weights, not the initial ones.
    current, restarted = server.classifier.current, restarts(server)
    trained = AlexNet(**current.net, seed=5).state_dict()
    version = server.classifier.publish(dataclasses.replace(current, state=trained))
    wait_for(lambda: client.classify([jpeg_bytes(1)]).model_version == version, timeout=60)
    before = client.classify([jpeg_bytes(1)], top_k=10)

    pid = server.classifier.engine.tower_info[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as refused:
        client.classify([jpeg_bytes(1)])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tower 1 died" in refused.value.details() and "retry" in refused.value.details()
    assert f"model version {version}" in refused.value.details()
    assert health(client) == health_pb2.HealthCheckResponse.NOT_SERVING  # while new towers start

    start = time.monotonic()
    wait_for(lambda: health(client) == health_pb2.HealthCheckResponse.SERVING, timeout=120, every=0.2)
    print(f"serving again {time.monotonic() - start:.1f} s after the refusal")
    after = client.classify([jpeg_bytes(1)], top_k=10)
    assert after.model_version == version
    assert [p.class_index for p in after.results[0].top] == [p.class_index for p in before.results[0].top]
    assert torch.allclose(
        torch.tensor([p.probability for p in after.results[0].top]),
        torch.tensor([p.probability for p in before.results[0].top]),
        atol=1e-6,
    )
    assert pid not in [t["pid"] for t in server.classifier.engine.tower_info]
    assert restarts(server) == restarted + 1


def test_an_idle_server_notices_a_dead_serving_tower_without_a_request(server, client):
    before = restarts(server)
    os.kill(server.classifier.engine.tower_info[0]["pid"], signal.SIGKILL)
    wait_for(lambda: restarts(server) > before, timeout=120, every=0.2)  # found by the idle check, rebuilt
    assert health(client) == health_pb2.HealthCheckResponse.SERVING
    assert client.classify([jpeg_bytes(2)]).results[0].top


def test_a_version_of_another_network_is_served_on_a_new_pair_when_a_serving_tower_died(server, client):
    """Another network's version rebuilds the serving towers in place (tests/test_variants.py); with one
    of them dead, the rebuild fails and a new pair serves it, the dead one's partner shut down."""
    current = server.classifier.current
    net = dict(current.net, num_classes=6)
    other = dataclasses.replace(current, state=AlexNet(**net, seed=6).state_dict(), labels=current.labels[:6], net=net)
    pids = [t["pid"] for t in server.classifier.engine.tower_info]
    os.kill(pids[1], signal.SIGKILL)
    version = server.classifier.publish(other)
    wait_for(lambda: answered_by(client) == version, timeout=120, every=0.2)
    assert len(client.classify([jpeg_bytes(3)], top_k=6).results[0].top) == 6
    assert not set(pids) & {t["pid"] for t in server.classifier.engine.tower_info}
    wait_for(lambda: not set(pids) & tower_pids(), timeout=30)  # the partner went with the old pair
    restored = server.classifier.publish(dataclasses.replace(current))  # the module's other tests serve 10 classes
    wait_for(lambda: answered_by(client) == restored, timeout=60)


def answered_by(client) -> int | None:
    """The model version that answers a Classify now, or None while it is refused."""
    try:
        return client.classify([jpeg_bytes(1)]).model_version
    except grpc.RpcError:
        return None


@pytest.fixture
def logged(caplog):
    """Every record the server (the root logger's) and Ray's own loggers write during the test."""
    ray_logger = logging.getLogger("ray")  # Ray's loggers need not reach the root's
    ray_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            yield caplog
    finally:
        ray_logger.removeHandler(caplog.handler)


def test_a_training_tower_killed_mid_job_is_replaced_and_the_job_finishes(server, client, tmp_path, logged):
    """...and the steps abandoned with it leave no error unread: Ray logs each one it was never asked
    for as "Unhandled error", which an operator would take for a second failure."""
    data = generate(tmp_path / "patterns", train_per_class=8, val_per_class=2)
    before, restarted = tower_pids(), restarts(server, "training")  # the serving pair, and actors still exiting
    job = client.train(
        data_dir=data / "train",
        val_dir=data / "val",
        overrides={"width": WIDTH, "epochs": 2, "batch_size": 8, "snapshot_every": 2, "publish_every": 100},
    )
    events, killed = [], []
    for event in client.watch(job.job_id):
        events.append(event)
        if event.kind == pb.TrainingEvent.STEP and event.progress.step == 3 and not killed:
            training = sorted(tower_pids() - before)  # the job's two towers
            assert len(training) == 2
            killed.append(training[0])
            os.kill(training[0], signal.SIGKILL)
    final = client.get(job.job_id)
    assert final.state == pb.FINISHED, final.error
    assert final.restarts == 1
    [recovered] = [e for e in events if e.kind == pb.TrainingEvent.RECOVERED]
    assert f"pid {killed[0]}" in recovered.message and "went back to the snapshot at step 2" in recovered.message
    assert restarts(server, "training") == restarted + 1
    gc.collect()  # Ray logs an unread error when its last reference goes
    time.sleep(2)
    assert any(r.getMessage().startswith("recovery 1:") for r in logged.records)  # the log shows the recovery
    assert [r.getMessage()[:200] for r in logged.records if "Unhandled error" in r.getMessage()] == []


def test_a_job_out_of_restarts_fails_with_one_readable_line(server, client, tmp_path):
    data = generate(tmp_path / "patterns", train_per_class=8, val_per_class=2)
    before = tower_pids()
    job = client.train(
        data_dir=data / "train",
        val_dir=data / "val",
        overrides={"width": WIDTH, "epochs": 2, "batch_size": 8, "max_restarts": 0, "publish_every": 100},
    )
    for event in client.watch(job.job_id):
        if event.kind == pb.TrainingEvent.STEP and event.progress.step == 2:
            pid = sorted(tower_pids() - before)[1]  # one of the job's two towers
            os.kill(pid, signal.SIGKILL)
            break
    final = wait_for(lambda: (j := client.get(job.job_id)).state == pb.FAILED and j, timeout=120)
    assert final.restarts == 0
    assert re.match(
        rf"RuntimeError: tower ([01]) \(died; pid {pid} on .*\) lost after 0 recoveries already \(max_restarts\): "
        r"TowerFailure: tower \1 died during the step",
        final.error,
    ), final.error
    assert "\n" not in final.error and "\x1b[" not in final.error  # no traceback, no terminal colours
