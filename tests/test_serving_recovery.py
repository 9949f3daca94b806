"""A serving tower killed with kill -9: Classify says UNAVAILABLE and to retry, health says
NOT_SERVING, and within seconds the server serves the same model version again on new towers."""

import dataclasses
import os
import signal
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from test_service import jpeg_bytes, wait_for

from client import AlexNetClient
from coordinator.service import Server, ServeOptions
from towers import AlexNet

WIDTH = 0.125


@pytest.fixture(scope="module")
def server(ray_session):
    srv = Server(ServeOptions(port=0, metrics_port=0, width=WIDTH, max_batch=8, max_delay_ms=2)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with AlexNetClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        c.wait_ready()
        yield c


def health(client):
    return client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def restarts(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith('alexnet_tower_restarts_total{role="serving"}'):
                return float(line.split()[-1])
    raise AssertionError("no alexnet_tower_restarts_total series for serving")


def test_a_killed_serving_tower_is_replaced_and_the_same_version_served_again(server, client):
    # Serve a version of our own, so that "the same version" means trained weights, not the initial ones.
    current = server.classifier.current
    trained = AlexNet(**current.net, seed=5).state_dict()
    version = server.classifier.publish(dataclasses.replace(current, state=trained))
    wait_for(lambda: client.classify([jpeg_bytes(1)]).model_version == version, timeout=60)
    before = client.classify([jpeg_bytes(1)], top_k=10)

    pid = server.classifier.engine.towers[1]["pid"]
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
    assert pid not in [t["pid"] for t in server.classifier.engine.towers]
    assert restarts(server) == 1


def test_an_idle_server_notices_a_dead_serving_tower_without_a_request(server, client):
    before = restarts(server)
    os.kill(server.classifier.engine.towers[0]["pid"], signal.SIGKILL)
    wait_for(lambda: restarts(server) > before, timeout=120, every=0.2)  # found by the idle check, rebuilt
    assert health(client) == health_pb2.HealthCheckResponse.SERVING
    assert client.classify([jpeg_bytes(2)]).results[0].top
