"""A tower that dies or hangs mid-training: the step fails in bounded time, naming it, and the
engine carries on once the tower is back (a replaced one rejoins the transport's links).

Real signals to real tower processes: SIGKILL for a death, SIGSTOP for a hang. Run on every transport.
"""

import logging
import os
import signal
import time

import pytest
import ray
import torch
import torch.nn.functional as F
from conftest import SMALL, relative_error

from coordinator import ModelParallelAlexNet
from coordinator.engine import TRANSPORTS, ExchangeError, TowerFailure
from towers import AlexNet

TIMEOUT = 2.0  # the engine's exchange timeout in these tests


@pytest.fixture(params=sorted(TRANSPORTS))
def engine(request, ray_session):
    engine = ModelParallelAlexNet(**SMALL, dropout=0.0, init="pytorch", transport=request.param, exchange_timeout=TIMEOUT)
    yield engine
    engine.shutdown()


def batch(seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 99, 99, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def reference_loss(state, images, labels):
    ref = AlexNet(**SMALL, dropout=0.0, init="pytorch")
    ref.load_state_dict(state)
    return F.cross_entropy(ref(images), labels).item()


def test_a_killed_tower_fails_the_steps_in_flight_naming_it_and_a_replacement_carries_on(engine):
    images, labels = batch(0)
    engine.train_step(images, labels)
    saved = engine.state_dict()
    steps = [engine.submit_step(images, labels) for _ in range(4)]  # a run in flight
    os.kill(engine.towers[1]["pid"], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TowerFailure, match=r"tower 1 died during the step, which was abandoned") as failure:
        ray.get(steps)
    assert failure.value.towers == [1]
    assert time.monotonic() - start < 60  # bounded: no hang on the dead peer

    engine.restart_tower(1)
    assert engine.towers[1]["pid"] != engine.towers[0]["pid"]
    engine.load_state_dict(saved)
    new_images, new_labels = batch(1)
    loss = engine.forward_backward(new_images, new_labels)
    assert loss == pytest.approx(reference_loss(saved, new_images, new_labels), rel=1e-5)
    engine.zero_grad()
    assert relative_error(engine.state_dict()["fc6.weight"], saved["fc6.weight"]) == 0


def test_a_hung_tower_fails_the_step_after_the_timeout_naming_it_and_the_engine_recovers(engine):
    images, labels = batch(2)
    engine.train_step(images, labels)
    pid = engine.towers[1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TowerFailure, match=r"tower 1 did not answer within 10 s") as failure:
            engine.train_step(images, labels)
        assert failure.value.towers == [1]
        assert type(failure.value) is TowerFailure and "\n" not in str(failure.value)  # itself, one line, no traceback
        assert "timed out after 2 s waiting for tower(s) [1]" in str(failure.value)
        assert time.monotonic() - start < 40
    finally:
        os.kill(pid, signal.SIGCONT)
    saved = engine.state_dict()
    loss = engine.forward_backward(images, labels)  # the same tower, answering again, linked again
    assert loss == pytest.approx(reference_loss(saved, images, labels), rel=1e-5)
    engine.zero_grad()


def test_a_hung_tower_fails_an_inference_pass_after_the_engines_timeout_not_rays_own(engine):
    """Inference runs as a Ray compiled graph, whose result Ray waits 10 s for unless told: the
    engine's exchange timeout governs it too. A busy machine then never fails a pass that Ray's
    10 s would cut short (a validation pass beside a classification load did), and a hung tower
    fails it in the time the engine was given."""
    images, _ = batch(3)
    expected = engine.predict(images)
    pid = engine.towers[0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ExchangeError, match=r"the inference pass got no answer from the towers within 2 s"):
            engine.predict(images)
        assert time.monotonic() - start < 9  # the engine's 2 s, not Ray's 10
    finally:
        os.kill(pid, signal.SIGCONT)
    assert torch.allclose(engine.predict(images), expected)  # the graph is built again over the same towers


def test_an_engine_shut_down_after_inference_leaves_its_graph_first_with_no_error_logged(ray_session, caplog):
    """The inference graph's teardown runs aside (a hung tower never leaves it), but shutdown waits
    for it before killing the towers: a tower killed inside the teardown makes Ray log an error
    with a traceback, which every clean stop of a server printed."""
    engine = ModelParallelAlexNet(**SMALL, dropout=0.0, init="pytorch", exchange_timeout=TIMEOUT)
    ray_dag = logging.getLogger("ray.dag")  # Ray's loggers need not reach the root's
    ray_dag.addHandler(caplog.handler)
    try:
        engine.predict(batch(4)[0])
        with caplog.at_level(logging.WARNING, logger="ray.dag"):
            engine.shutdown()
            time.sleep(1)  # a teardown still running would log within this
    finally:
        ray_dag.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

