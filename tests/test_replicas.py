"""Data-parallel replicas of the two-tower model: R groups, each on 1/R of the batch, their
gradients all-reduced, are the single-process step on the whole batch."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import reference_grads

from conftest import SMALL, relative_error
from coordinator import ModelParallelAlexNet
from towers import AlexNet, paper_sgd
from towers.ops import dropout_mask

BATCH = 8  # 4 per group


def batches(steps: int):
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        yield (
            torch.randn(BATCH, 3, SMALL["image_size"], SMALL["image_size"], generator=gen, dtype=torch.float64),
            torch.randint(0, SMALL["num_classes"], (BATCH,), generator=gen),
        )


@pytest.fixture(scope="module")
def pair(ray_session):
    """Two replica groups in float64 with dropout on, and the reference with the same weights."""
    ref = AlexNet(**SMALL, dropout=0.5, init="pytorch", seed=3).double()
    engine = ModelParallelAlexNet(**SMALL, dropout=0.5, init="pytorch", seed=3, dtype=torch.float64, replicas=2)
    yield engine, ref
    engine.shutdown()


def test_a_sample_keeps_its_dropout_mask_whatever_the_split():
    whole = dropout_mask(5, "fc6", 1, BATCH, 64, 0.5)
    halves = [dropout_mask(5, "fc6", 1, BATCH // 2, 64, 0.5, first=f) for f in (0, BATCH // 2)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0], halves[1])  # the second half is not the first drawn again
    assert 0.3 < (whole > 0).float().mean().item() < 0.7


def test_two_groups_give_the_reference_loss_and_every_gradient_on_the_whole_batch(pair):
    engine, ref = pair
    engine.load_state_dict(ref.state_dict())
    images, labels = next(batches(1))
    expected_loss, expected = reference_grads(ref, images, labels, dropout_seed=21)
    loss = engine.forward_backward(images, labels, dropout_seed=21)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    grads = engine.gradients()
    engine.zero_grad()
    errors = {name: relative_error(grads[name], expected[name]) for name in expected}
    assert max(errors.values()) < 1e-10, errors
    # Each group saw only its half: the halves' losses differ, so the split really happened.
    half_losses = [reference_grads(ref, images[h], labels[h], dropout_seed=21)[0] for h in (slice(0, 4), slice(4, 8))]
    assert half_losses[0] != pytest.approx(half_losses[1], rel=1e-3)


def test_three_sgd_steps_equal_the_reference_and_the_groups_never_drift_apart(pair):
    engine, ref = pair
    engine.load_state_dict(ref.state_dict())
    optimizer = paper_sgd(ref, lr=0.01, momentum=0.9, weight_decay=5e-4)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    for step, (images, labels) in enumerate(batches(3)):
        reference_grads(ref, images, labels, dropout_seed=30 + step)
        optimizer.step()
        engine.train_step(images, labels, dropout_seed=30 + step)
        group0, group1 = engine.replica_checksums()
        assert group0 == group1, f"the groups drifted apart at step {step}"
    actual, expected = engine.state_dict(), ref.state_dict()
    errors = {k: relative_error(actual[k], expected[k]) for k in expected}
    assert max(errors.values()) < 1e-10, errors
    assert all(not torch.equal(expected[k], start[k]) for k in expected)  # the weights moved
    stats = engine.take_stats()
    assert len(stats["towers"]) == 4 and all(t["allreduce_bytes"] > 0 for t in stats["towers"])


def test_a_batch_that_does_not_split_evenly_is_refused(pair):
    engine, _ = pair
    images, labels = next(batches(1))
    with pytest.raises(
        ValueError, match="does not split evenly among 2 replica groups: use a batch size that is a multiple of 2"
    ):
        engine.train_step(images[:7], labels[:7])
    with pytest.raises(ValueError, match="replicas must be a whole number of at least 1"):
        ModelParallelAlexNet(**SMALL, replicas=0)


def test_groups_keep_their_towers_on_one_node_spread_over_nodes_and_a_lost_node_is_survived(tmp_path):
    """A Ray cluster of four raylets on this machine (ray.cluster_utils.Cluster), in a process of
    its own: group 1's node is removed mid-training, and the run carries on to its end."""
    script = Path(__file__).with_name("multinode_replicas.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    before, after = [t["node"] for t in report["before"]], [t["node"] for t in report["after"]]
    assert before[0] == before[1] and before[2] == before[3] and before[0] != before[2]  # packed, and spread
    assert report["removed"] == [before[2]]
    assert after[:2] == before[:2]  # group 0 untouched
    assert after[2] == after[3] and after[2] not in (before[0], before[2])  # group 1 again on one node: the spare
    recovered = [e for e in report["events"] if e["kind"] == "recovered"]
    assert len(recovered) == 1 and "group 1 tower 0 (died" in recovered[0]["message"]
    # The coordinator stays beside the driver, not on a group's node, before and after the loss.
    assert report["coordinator_nodes"] == [report["driver_node"]] * 2
    assert (report["state"], report["steps"], report["restarts"]) == ("finished", 18, 1)
    group0, group1 = report["checksums"]
    assert group0 == group1


def test_a_run_whose_towers_leave_no_cpu_for_loading_is_refused_not_left_waiting(ray_session):
    from coordinator.data.loader import check_room_for_loading

    @ray_session.remote
    class Holder:
        def ready(self):
            return True

    # The free CPUs once they stop changing: an earlier test's actors may still be going, and a CPU
    # they give back later would make room for loading under this test's feet.
    seen, deadline = [], time.monotonic() + 60
    while len(seen) < 10 or len(set(seen[-10:])) > 1:  # the same for 2 s
        assert time.monotonic() < deadline, f"the free CPUs never settled: {seen[-10:]}"
        seen.append(ray_session.available_resources().get("CPU", 0))
        time.sleep(0.2)
    free = seen[-1]
    holder = Holder.options(num_cpus=free).remote()  # as towers of many replica groups would
    ray_session.get(holder.ready.remote())
    try:
        with pytest.raises(
            RuntimeError, match="loading images needs half a CPU beside them: train with fewer replicas"
        ):
            check_room_for_loading(wait=0.5)
    finally:
        ray_session.kill(holder)
    check_room_for_loading()  # and once they are gone, there is room again
