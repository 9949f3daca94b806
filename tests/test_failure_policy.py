"""The failure policy (coordinator/engine/failures.py): its decisions, and its probe and act on a
real engine whose coordinator is killed (the towers' deaths are in test_tower_failures.py)."""

import os
import signal

import pytest
import ray
import torch

from conftest import SMALL
from coordinator import ModelParallelAlexNet
from coordinator.engine import FailureDecision, FailurePolicy, TowerFailure
from coordinator.engine.failures import Lost, probe, replace

DIED = Lost({1: "died"}, names=["tower 1 (died; pid 7 on host)"])


def test_a_lost_actor_restarts_until_max_restarts_then_the_run_gives_up_in_one_line():
    policy, error = FailurePolicy(max_restarts=2), TowerFailure("tower 1 died during the step", [1])
    assert policy.decide(error, DIED, restarts=1) is FailureDecision.RESTART
    assert policy.decide(error, DIED, restarts=2) is FailureDecision.RAISE
    given_up = policy.raised(error, DIED, restarts=2)
    assert str(given_up) == (
        "tower 1 (died; pid 7 on host) lost after 2 recoveries already (max_restarts): "
        "TowerFailure: tower 1 died during the step"
    )
    assert given_up.__cause__ is error


def test_an_error_no_lost_actor_explains_is_raised_as_it_is_and_an_idle_probe_that_finds_nothing_is_a_noop():
    policy, error = FailurePolicy(), ValueError("a batch of 3 images does not split evenly")
    assert policy.decide(error, Lost()) is FailureDecision.RAISE and policy.raised(error, Lost(), 0) is error
    assert policy.decide(error, DIED) is FailureDecision.RAISE  # whatever a probe found, the error is not theirs
    assert policy.decide(TowerFailure("tower 1 hung", [1]), Lost()) is FailureDecision.RAISE  # back meanwhile
    assert policy.decide(None, Lost()) is FailureDecision.NOOP
    assert policy.decide(None, DIED) is FailureDecision.RESTART


def test_a_replica_group_that_kept_its_towers_is_restarted_from_only_when_no_update_was_made():
    policy, lost = FailurePolicy(), Lost({2: "died"})  # group 1's tower 0, of two groups of two
    before_update = TowerFailure("group 1 tower 0 died", [2], before_update=True)
    assert policy.healthy_group(before_update, lost, replicas=2, towers=2) == 0
    assert policy.healthy_group(before_update, Lost({0: "died", 3: "died"}), replicas=2, towers=2) is None
    assert policy.healthy_group(TowerFailure("died", [2]), lost, replicas=2, towers=2) is None  # some updated
    assert policy.healthy_group(before_update, Lost({1: "died"}), replicas=1, towers=2) is None


def test_a_killed_coordinator_is_found_by_the_probe_and_replaced_and_the_engine_goes_on(ray_session):
    with ModelParallelAlexNet(**SMALL, dropout=0.0, init="pytorch") as engine:
        images, labels = torch.randn(4, 3, 99, 99), torch.randint(0, 10, (4,))
        engine.train_step(images, labels)
        assert not probe(engine)
        os.kill(ray.get(engine.coordinator.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)
        lost = probe(engine)
        assert (lost.towers, lost.coordinator, lost.names) == ({}, "died", ["the coordinator (died)"])
        assert FailurePolicy().decide(None, lost) is FailureDecision.RESTART
        assert replace(engine, lost) == ["the coordinator (died)"]
        assert not probe(engine) and engine.transport  # a new coordinator, which linked the towers
        saved = engine.state_dict()
        assert engine.forward_backward(images, labels) == pytest.approx(engine.forward_backward(images, labels))
        engine.zero_grad()
        assert all(torch.equal(saved[k], v) for k, v in engine.state_dict().items())
