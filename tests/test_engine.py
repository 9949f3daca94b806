"""ModelParallelAlexNet on a real local Ray, proven equal to the single-process towers.AlexNet.

The equivalence tests run on each way a CPU pair exchanges: shared memory (transport "auto", the
towers on one host) and Gloo (transport "gloo", as between hosts).
"""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, relative_error
from coordinator import ModelParallelAlexNet, Placement
from equivalence import clear_pool_winners
from towers import AlexNet, paper_sgd
from towers.inputs import crops_of

BOUND = 1e-5


def reference_grads(ref, images, labels, dropout_seed=None):
    ref.zero_grad(set_to_none=True)
    ref.train()
    loss = F.cross_entropy(ref(images, dropout_seed=dropout_seed), labels)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in ref.named_parameters()}


def assert_equivalent(engine, ref, images, labels, names=None, bound=BOUND, dropout_seed=None):
    ref.eval()
    with torch.no_grad():
        expected_logits = ref(images)
    assert relative_error(engine.predict(images), expected_logits) <= bound
    expected_loss, expected = reference_grads(ref, images, labels, dropout_seed)
    loss = engine.forward_backward(images, labels, dropout_seed=dropout_seed)
    assert loss == pytest.approx(expected_loss, rel=bound)
    grads = engine.gradients()
    assert list(grads) == [n for n, _ in ref.named_parameters()]
    errors = {n: relative_error(grads[n], expected[n]) for n in (names or grads)}
    assert max(errors.values()) <= bound, errors
    engine.zero_grad()  # leave no gradients behind for the next test
    return errors


EXCHANGES = {"auto": "shared memory", "gloo": "gloo"}  # transport -> what carries a CPU pair's exchanges


@pytest.fixture(scope="module", params=sorted(EXCHANGES))
def transport(request):
    return request.param


@pytest.fixture(scope="module")
def small_engine(ray_session, transport):
    engine = ModelParallelAlexNet(**SMALL, dropout=0.0, init="pytorch", transport=transport)
    yield engine
    engine.shutdown()


@pytest.fixture
def small_reference(small_engine):
    ref = AlexNet(**SMALL, dropout=0.0, init="pytorch", seed=1)
    small_engine.load_state_dict(ref.state_dict())
    return ref


def test_starts_from_the_references_weights_for_the_same_seed(small_engine):
    expected = AlexNet(**SMALL, dropout=0.0, init="pytorch", seed=0).state_dict()
    fresh = ModelParallelAlexNet(**SMALL, dropout=0.0, init="pytorch", seed=0)
    try:
        actual = fresh.state_dict()
    finally:
        fresh.shutdown()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_forward_loss_and_every_gradient_match_the_reference(small_engine, small_reference):
    images, seed = clear_pool_winners(small_reference, batch=4)
    labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(seed))
    assert_equivalent(small_engine, small_reference, images, labels)


def test_three_sgd_steps_match_the_reference(small_engine, small_reference):
    optimizer = paper_sgd(small_reference, lr=0.01, momentum=0.9, weight_decay=5e-4)
    first_seed = 100
    for _ in range(3):
        images, first_seed = clear_pool_winners(small_reference, batch=4, first_seed=first_seed + 1)
        labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(first_seed))
        reference_grads(small_reference, images, labels)
        optimizer.step()
        small_engine.train_step(images, labels)
    actual, expected = small_engine.state_dict(), small_reference.state_dict()
    errors = {k: relative_error(actual[k], expected[k]) for k in expected}
    assert max(errors.values()) <= BOUND, errors
    # The weights really moved: the comparison is not between two untouched copies.
    start = AlexNet(**SMALL, dropout=0.0, init="pytorch", seed=1).state_dict()
    assert all(not torch.equal(expected[k], start[k]) for k in expected)


def test_dropout_uses_the_same_masks_given_the_same_seed(ray_session, transport):
    ref = AlexNet(**SMALL, dropout=0.5, init="pytorch", seed=2)
    engine = ModelParallelAlexNet(**SMALL, dropout=0.5, init="pytorch", seed=2, transport=transport)
    try:
        images, seed = clear_pool_winners(ref, batch=4, first_seed=200)
        labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(seed))
        assert_equivalent(engine, ref, images, labels, dropout_seed=7)
        # Dropout is really on: another seed gives another loss, and eval logits differ from training ones.
        assert engine.forward_backward(images, labels, dropout_seed=8) != pytest.approx(
            engine.forward_backward(images, labels, dropout_seed=7), rel=1e-6
        )
    finally:
        engine.shutdown()


def test_full_size_float64_every_gradient(ray_session, transport):
    """Full size, batch 2. In float64 no pooling window is ever a near-tie, so every gradient must agree."""
    ref = AlexNet(init="pytorch", dropout=0.0).double()
    engine = ModelParallelAlexNet(init="pytorch", dropout=0.0, dtype=torch.float64, transport=transport)
    try:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 227, 227, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 1000, (2,), generator=gen)
        errors = assert_equivalent(engine, ref, images, labels)
        assert max(errors.values()) < 1e-10  # far inside the bound: float64 rounding only
    finally:
        engine.shutdown()


def test_full_size_float32_logits_loss_and_classifier_gradients(ray_session, transport):
    """Full size, batch 2, float32. The classifier's gradients pass through no max-pool, so they
    must agree whatever the rounding; the convolutions' are proven above (small width in float32,
    full size in float64) because full-size inputs always hold some near-tied pooling windows."""
    ref = AlexNet(init="pytorch", dropout=0.0)
    engine = ModelParallelAlexNet(init="pytorch", dropout=0.0, transport=transport)
    try:
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(2, 3, 227, 227, generator=gen)
        labels = torch.randint(0, 1000, (2,), generator=gen)
        classifier = [f"{n}.{p}" for n in ("fc6", "fc7", "fc8") for p in ("weight", "bias")]
        assert_equivalent(engine, ref, images, labels, names=classifier)
    finally:
        engine.shutdown()


def test_each_exchange_moves_the_all_gather_and_reduce_scatter_volume(small_engine, small_reference):
    small_engine.take_stats()
    images = torch.randn(3, 3, 99, 99)
    small_engine.train_step(images, torch.tensor([1, 2, 3]))
    stats = small_engine.take_stats()
    cfg = small_engine.config
    for point, before in zip(("conv3", "fc6", "fc7", "fc8"), cfg.segments[:-1]):
        last = before[-1]
        per_tower = [3 * n * last.out_size**2 * 4 for n in last.out_split]  # float32 bytes
        for t, tower in enumerate(stats["towers"]):
            others = sum(per_tower) - per_tower[t]
            assert tower["exchange_bytes"][(point, "forward")] == others  # all-gather: the others' outputs
            assert tower["exchange_bytes"][(point, "backward")] == per_tower[t]  # reduce-scatter: 1 partial
    assert {stage for stage, _ in stats["towers"][0]["compute_seconds"]} == {
        "conv1-conv2",
        "conv3-conv5",
        "fc6",
        "fc7",
        "fc8",
    }


def test_towers_get_a_cpu_core_each(small_engine):
    assert small_engine.placement.kind == "cpu"
    assert [t["tower"] for t in small_engine.tower_info] == [0, 1]
    assert len({t["pid"] for t in small_engine.tower_info}) == 2  # two processes
    assert all(t["threads"] == 1 and t["device"] == "cpu" for t in small_engine.tower_info)
    assert sum(t["parameters"] for t in small_engine.tower_info) == small_engine.config.parameter_count()
    assert all(t["keeps_freed_memory"] for t in small_engine.tower_info)  # this machine's libc is glibc


def test_towers_can_be_told_to_return_freed_memory(ray_session):
    engine = ModelParallelAlexNet(**SMALL, keep_freed_memory=False)
    try:
        assert not any(t["keeps_freed_memory"] for t in engine.tower_info)
        assert engine.train_step(torch.randn(2, 3, 99, 99), torch.tensor([0, 1])) > 0
    finally:
        engine.shutdown()


# Ten "steps" that each make and free the same few large tensors, as a tower's training step does;
# prints the page faults of all but the first.
_STEPS = """
import resource, sys, torch
from coordinator.engine.tower_actor import keep_freed_memory_in_heap
if sys.argv[1] == "keep":
    assert keep_freed_memory_in_heap()
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = torch.ones(18 << 20)
    pooled = activations[: 12 << 20] * 2
    gradient = torch.ones_like(activations)
    del activations, pooled, gradient
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def test_towers_reuse_freed_blocks_instead_of_faulting_in_fresh_pages():
    def faults(mode):
        root = Path(__file__).resolve().parent.parent
        run = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=root, capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    fresh = faults("default")
    assert fresh >= 9 * 48 * 1024  # every step faults in its 192 MiB afresh: 49152 pages of 4 KiB
    # Kept memory is reused; now and then a block misses a free piece it fits (0-13% in 20 runs).
    assert faults("keep") < fresh / 3


def test_placement_follows_the_devices():
    assert Placement.plan(2, resources={"GPU": 8, "CPU": 64}) == Placement("gpu", {"num_gpus": 1, "num_cpus": 1})
    assert Placement.plan(2, resources={"GPU": 1, "CPU": 16}) == Placement(
        "shared-gpu",
        {"num_gpus": 0.25, "num_cpus": 1},  # room for a serving pair beside a training pair
    )
    assert Placement.plan(2, resources={"CPU": 2}) == Placement("cpu", {"num_cpus": 1})
    with pytest.raises(RuntimeError, match="need 2 CPUs"):
        Placement.plan(2, resources={"CPU": 1})


def test_towers_that_cannot_be_placed_give_a_clear_error_not_a_hang(small_engine):
    import ray

    free = ray.available_resources()["CPU"]  # the small engine holds two of the session's eight
    expected = r"did not start within 2 s: each needs \{'num_cpus': 4\}, and the cluster has \{'CPU': [\d.]+\} free"
    with pytest.raises(RuntimeError, match=expected):
        ModelParallelAlexNet(**SMALL, cpus_per_tower=4, start_timeout=2)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.1)
    # The waiting actors were removed (an earlier test's actors, still going, may give back more)
    assert ray.available_resources().get("CPU", 0) >= free
    small_engine.train_step(torch.randn(2, 3, 99, 99), torch.tensor([0, 1]))  # and the engine beside it still works


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (torch.randn(2, 3, 64, 64), [0, 1], r"images must have shape \[N, 3, 99, 99\]"),
        (torch.randn(2, 99, 99), [0, 1], "images must have shape"),
        (torch.randn(0, 3, 99, 99), [], "empty batch"),
        (torch.full((2, 3, 99, 99), float("nan")), [0, 1], "NaN"),
        (torch.randn(2, 3, 99, 99), [0, 10], r"labels must be in \[0, 10\)"),
        (torch.randn(2, 3, 99, 99), [0], "labels must be 2 integer class indices"),
        (torch.randn(2, 3, 99, 99), [0.5, 1.0], "integer class indices"),
    ],
)
def test_bad_batches_are_refused_clearly(small_engine, images, labels, message):
    with pytest.raises(ValueError, match=message):
        small_engine.train_step(images, torch.tensor(labels))
    small_engine.train_step(torch.randn(2, 3, 99, 99), torch.tensor([0, 1]))  # and it keeps working


def test_load_state_dict_refuses_a_wrong_shape(small_engine):
    sd = AlexNet(**SMALL).state_dict()
    sd["conv2.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"conv2.weight has shape \(5, 5\)"):
        small_engine.load_state_dict(sd)
    del sd["conv2.weight"]
    with pytest.raises(KeyError, match="conv2.weight"):
        small_engine.load_state_dict(sd)


def test_what_carries_the_exchanges_is_reported(small_engine, transport):
    assert small_engine.transport == EXCHANGES[transport]
    assert small_engine.take_stats()["transport"] == EXCHANGES[transport]


def test_hyperparameters_are_checked(ray_session):
    with pytest.raises(ValueError, match="unknown transport .carrier-pigeon.: choose one of auto, gloo, nccl"):
        ModelParallelAlexNet(**SMALL, transport="carrier-pigeon")
    with pytest.raises(ValueError, match="exchange_timeout must be positive"):
        ModelParallelAlexNet(**SMALL, exchange_timeout=0)
    with pytest.raises(ValueError, match="lr must be non-negative"):
        ModelParallelAlexNet(**SMALL, lr=-1)
    with pytest.raises(ValueError, match="dtype must be"):
        ModelParallelAlexNet(**SMALL, dtype=torch.float16)
    with pytest.raises(ValueError, match="nice must be between 0 and 19, got 20"):
        ModelParallelAlexNet(**SMALL, nice=20)


def test_towers_can_yield_the_cpu(ray_session):
    """nice: a serving pair beside a training pair may run at a lower CPU priority (serve --serving-nice)."""
    # Ray starts its workers at a priority of its own (RAY_worker_niceness, 15): the towers go below it.
    base = ray_session.get(ray_session.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
    with ModelParallelAlexNet(**SMALL, nice=2) as engine:
        assert [t["nice"] for t in engine.tower_info] == [min(19, base + 2)] * 2 and base + 2 <= 19
        # Every thread, torch's pool too (started by the first step), runs at that priority.
        engine.train_step(torch.randn(2, 3, 99, 99), torch.tensor([0, 1]))
        pid = engine.tower_info[0]["pid"]
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == {base + 2}


def test_a_step_is_one_call_to_each_tower(small_engine):
    small_engine.take_stats()
    for _ in range(3):
        small_engine.train_step(torch.randn(2, 3, 99, 99), torch.tensor([0, 1]))
    assert small_engine.take_stats()["tower_calls"] == 3 * 2  # three steps, two towers: nothing else
    small_engine.predict(torch.randn(2, 3, 99, 99))
    assert small_engine.take_stats()["tower_calls"] == 2  # an inference pass too


def test_crops_reach_the_towers_as_the_very_pixels_they_stand_for(small_engine, small_reference):
    """The batch travels as uint8 crops and colour offsets, made float on each tower: the step is
    bit for bit the step on the float pixels the data pipeline would have made."""
    gen = np.random.default_rng(4)
    crops = crops_of(
        gen.integers(0, 256, (4, 99, 99, 3), dtype=np.uint8),
        gen.normal(0, 5, (4, 3)),
        (123.68, 116.779, 103.939),
        (58.4, 57.1, 57.4),
    )
    pixels = crops.to_tensor()
    labels = torch.tensor([1, 2, 3, 4])
    assert pixels.dtype == torch.float32 and pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(small_engine.predict(crops), small_engine.predict(pixels))
    from_crops = small_engine.forward_backward(crops, labels, dropout_seed=1)
    grads = small_engine.gradients()
    small_engine.zero_grad()
    assert small_engine.forward_backward(pixels, labels, dropout_seed=1) == from_crops
    assert all(torch.equal(grads[k], v) for k, v in small_engine.gradients().items())
    small_engine.zero_grad()
    with pytest.raises(ValueError, match=r"crops must be uint8 of shape \[N, H, W, 3\], got float32"):
        small_engine.predict(dataclasses.replace(crops, pixels=crops.pixels.astype(np.float32)))
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, 99, 99\], got \[4, 3, 64, 64\]"):
        small_engine.predict(crops_of(np.zeros((4, 64, 64, 3), np.uint8), np.zeros((4, 3)), (0, 0, 0)))


def test_a_towers_solo_step_is_timed_on_a_copy(small_engine):
    before = small_engine.state_dict()
    seconds = small_engine.solo_step_seconds(torch.randn(4, 3, 99, 99), torch.tensor([0, 1, 2, 3]), steps=2)
    assert [len(s) for s in seconds] == [2, 2] and all(0 < t < 60 for s in seconds for t in s)
    assert all(torch.equal(before[k], v) for k, v in small_engine.state_dict().items())  # the towers' own weights stay
