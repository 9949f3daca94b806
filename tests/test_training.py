"""The training loop: presets and overrides, schedules, stopping, checkpoints, and real learning."""

import dataclasses
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coordinator import ModelParallelAlexNet
from coordinator.data import Batch, open_dataset
from coordinator.data.patterns import generate
from coordinator.training import PRESETS, PlateauSchedule, Recipe, RunOptions, StepSchedule, run_spec, train
from coordinator.training.passes import SkipLog, class_probabilities, evaluate, validation_pass
from coordinator.training.recipe import RUN_OPTIONS
from towers.inputs import crops_of


def test_paper_preset_is_the_papers_recipe():
    paper, options = PRESETS["paper"]
    assert (paper.batch_size, paper.lr, paper.momentum, paper.weight_decay) == (128, 0.01, 0.9, 5e-4)
    assert (paper.init, options.epochs, paper.dropout, paper.schedule) == ("paper", 90, 0.5, "plateau")
    assert paper.max_drops == 3 and paper.width == 1.0 and not paper.normalise


def test_demo_preset_keeps_the_network():
    demo = PRESETS["demo"].recipe
    assert demo.width == 1.0 and demo.dropout == 0.5  # the same network: only the recipe is tuned


def test_overrides_are_converted_and_checked():
    spec = run_spec("paper", {"epochs": "3", "lr": "0.02", "lr_epochs": "2,4", "ten_crop": "true"})
    assert (spec.options.epochs, spec.recipe.lr, spec.recipe.lr_epochs, spec.recipe.ten_crop) == (3, 0.02, (2, 4), True)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        run_spec("fast")
    with pytest.raises(ValueError, match="unknown override colour: the recipe's are batch_size, lr,"):
        run_spec("demo", {"colour": "red"})
    with pytest.raises(ValueError, match="unknown override x{37}\\.\\.\\.: "):  # a long name is cut short
        run_spec("demo", {"x" * 10_000: "1"})
    with pytest.raises(ValueError, match="lr must be"):
        run_spec("demo", {"lr": "-0.1"})
    with pytest.raises(ValueError, match="dropout must be in"):
        run_spec("demo", {"dropout": "1.5"})
    with pytest.raises(ValueError, match="ten_crop='maybe' is not a valid bool"):
        run_spec("demo", {"ten_crop": "maybe"})
    with pytest.raises(ValueError, match="snapshot_every must be at least 1, got 0"):
        run_spec("demo", {"snapshot_every": "0"})
    with pytest.raises(ValueError, match="transport must be one of auto, gloo, nccl, got 'pigeon'"):
        run_spec("demo", {"transport": "pigeon"})
    with pytest.raises(ValueError, match=r"batch_size \(64\) must be a multiple of replicas \(3\)"):
        run_spec("demo", {"replicas": "3"})
    assert run_spec("demo", {"transport": "gloo"}).options.transport == "gloo"
    # A transport retired with the one-call step still reads, as saved recipes and checkpoints name it
    # (the engine maps it).
    assert run_spec("demo", {"transport": "object_store"}).options.transport == "object_store"


def test_each_override_goes_to_the_recipe_or_the_run_options_that_has_it():
    """One parser: a field of the mathematics lands in the recipe, one of operating the run in the
    run options; the preset's other values stay."""
    recipe, options = run_spec("demo", {"lr": "0.005", "snapshot_every": "50", "replicas": "2", "width": "0.5"})
    assert (recipe.lr, recipe.width, recipe.batch_size) == (0.005, 0.5, 64)
    assert (options.snapshot_every, options.replicas, options.epochs, options.publish_every) == (50, 2, 5, 10)
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    assert recipe_fields.isdisjoint(f.name for f in dataclasses.fields(RunOptions))
    assert {"epochs", "snapshot_every", "max_restarts", "transport", "replicas", "precision"} <= set(RUN_OPTIONS)
    assert {"lr", "batch_size", "width", "schedule", "seed"} <= recipe_fields


def test_plateau_schedule_divides_when_validation_error_stalls():
    schedule = PlateauSchedule(0.01, patience=1, max_drops=3)
    assert schedule.update(0, 0.80) == 0.01  # first result: improving
    assert schedule.update(1, 0.60) == 0.01  # still improving
    assert schedule.update(2, 0.60) == pytest.approx(0.001)  # stalled: divide by 10
    assert schedule.update(3, 0.50) == pytest.approx(0.001)
    assert schedule.update(4, 0.55) == pytest.approx(0.0001)
    assert schedule.update(5, 0.55) == pytest.approx(0.00001)
    assert schedule.update(6, 0.55) == pytest.approx(0.00001)  # three times at most
    patient = PlateauSchedule(0.01, patience=2)
    assert patient.update(0, 0.5) == 0.01 and patient.update(1, 0.5) == 0.01
    assert patient.update(2, 0.5) == pytest.approx(0.001)


def test_step_schedule_is_the_2012_codes():
    schedule = StepSchedule(0.01, (25, 51))
    rates = {epoch + 1: schedule.update(epoch, 0.5) for epoch in range(60)}
    assert rates[24] == 0.01 and rates[25] == pytest.approx(0.001) and rates[50] == pytest.approx(0.001)
    assert rates[51] == pytest.approx(0.0001)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("patterns") / "p", train_per_class=40, val_per_class=12)
    return open_dataset(root / "train", root / "val")


def test_stop_ends_at_a_step_boundary_with_a_checkpoint(ray_session, patterns, tmp_path):
    stop = threading.Event()
    published, stats = [], []

    def on_event(event):
        if event.kind == "step" and event.step == 3:
            stop.set()

    result = train(
        patterns,
        run_spec(
            "demo",
            {
                "width": 0.125,
                "epochs": 50,
                "batch_size": 16,
                "publish_every": 2,
                "transport": "gloo",
                "checkpoint_every": 2,
            },
        ),
        on_event=on_event,
        stop=stop,
        on_publish=lambda step, state: published.append((step, state)),
        on_stats=stats.append,
        checkpoint_dir=tmp_path,
    )
    assert stats and all(s["transport"] == "gloo" for s in stats)  # the recipe's transport was used (not shared memory)
    # The step already under way when stop was asked (the loop keeps one in flight) completes; no other starts.
    assert result.state == "stopped" and result.steps in (3, 4)
    assert [step for step, _ in published] == sorted({2, result.steps})  # every 2 steps, and at the end
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert checkpoint["step"] == result.steps and checkpoint["classes"] == patterns.classes
    assert set(checkpoint["state_dict"]) == set(published[-1][1])
    assert all(torch.equal(checkpoint["state_dict"][k], published[-1][1][k]) for k in checkpoint["state_dict"])
    assert len(checkpoint["optimizer"]) == 2  # each tower's momentum buffers
    from coordinator.training.checkpoints import read_index

    assert sorted(v["step"] for v in read_index(tmp_path).values()) == sorted(
        {2, result.steps}
    )  # every 2 steps, and on stop


def test_a_diverging_run_fails_with_advice(ray_session, patterns):
    with pytest.raises(FloatingPointError, match="lower lr"):
        train(patterns, run_spec("demo", {"width": 0.125, "lr": 1e6, "epochs": 1, "batch_size": 16, "init": "pytorch"}))


class MeanColourClassifier:
    """A stand-in for the engine whose logits are each image's mean colour: every view scores differently."""

    def predict(self, crops):
        return crops.to_tensor().mean(dim=(2, 3)) * 5


def test_ten_crop_probabilities_average_each_images_ten_softmaxes():
    pixels = np.random.default_rng(0).integers(0, 256, (4 * 10, 8, 8, 3), dtype=np.uint8)  # ten views of 4 images
    views = Batch(
        crops_of(pixels, np.zeros((40, 3)), (100.0, 110.0, 120.0)), torch.zeros(4, dtype=torch.long), [], views=10
    )
    probs = class_probabilities(MeanColourClassifier(), views)
    by_hand = torch.stack(
        [torch.stack([(v.mean(dim=(1, 2)) * 5).softmax(0) for v in image]).mean(0) for image in views.images]
    )
    assert torch.allclose(probs, by_hand, atol=1e-6)
    centre = Batch(views.crops[4::10], views.labels, [])
    assert not torch.allclose(probs, class_probabilities(MeanColourClassifier(), centre), atol=1e-3)


def test_ten_crop_validation_ranks_the_averaged_softmax(ray_session, patterns):
    spec = run_spec("demo", {"ten_crop": "true", "val_images": 12, "width": 0.125})
    with ModelParallelAlexNet(num_classes=10, width=0.125, dropout=0.0, init="pytorch", seed=4) as engine:
        [batch] = list(validation_pass(patterns, spec.recipe))
        assert batch.images.shape == (12, 10, 3, 227, 227)  # the paper's ten views of each image
        probs = class_probabilities(engine, batch)
        top1, top5 = evaluate(engine, validation_pass(patterns, spec.recipe), SkipLog())
    ranked = probs.argsort(dim=1, descending=True)
    assert top1 == (ranked[:, 0] == batch.labels).float().mean().item()
    assert top5 == (ranked[:, :5] == batch.labels[:, None]).any(dim=1).float().mean().item()


def test_a_tower_killed_mid_run_is_replaced_and_the_run_ends_as_if_nothing_happened(ray_session, patterns, tmp_path):
    """kill -9 of a training tower: the run replaces it, goes back to its last snapshot, replays the
    batches since, and ends with the weights of a run that was never interrupted. Its TensorBoard
    log draws each step once, as the uninterrupted run's does."""
    spec = run_spec("demo", {"width": 0.125, "epochs": 2, "batch_size": 16, "steps_per_epoch": 8, "snapshot_every": 3})
    engine = ModelParallelAlexNet(num_classes=patterns.num_classes, width=0.125, init="kaiming")
    untouched = []
    straight = train(
        patterns, spec, on_publish=lambda step, state: untouched.append(state), log_dir=tmp_path / "straight"
    )
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event.kind == "step" and event.step == 5 and not killed:
            killed.append(engine.tower_info[1]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    try:
        result = train(
            patterns,
            spec,
            on_event=on_event,
            engine=engine,
            on_publish=lambda step, state: None,
            log_dir=tmp_path / "killed",
        )
        assert killed[0] not in [t["pid"] for t in engine.tower_info]  # a new process hosts tower 1
        weights = engine.state_dict()
    finally:
        engine.shutdown()
    [recovered] = [e for e in events if e.kind == "recovered"]
    assert result.state == "finished" and result.restarts == 1 and recovered.restarts == 1
    assert f"replaced tower 1 (died; pid {killed[0]}" in recovered.message
    assert "went back to the snapshot at step 3 (epoch 1, batch 3 of 8): 2 steps to redo" in recovered.message
    assert recovered.step == 3 and recovered.replaced == 1 and recovered.recovery_seconds > 0
    steps = [e.step for e in events if e.kind == "step"]
    assert steps[steps.index(5) + 1] == 4  # the step after the recovery counts on from the snapshot
    assert result.steps == straight.steps == 16 and result.top1 == straight.top1
    assert_same_weights(weights, untouched[-1])
    losses = logged(tmp_path / "killed", "train/loss")
    assert [step for step, _ in losses] == list(range(1, 17))  # steps 4 and 5, replayed, are drawn once
    assert losses == logged(tmp_path / "straight", "train/loss")


def logged(log_dir, tag) -> list[tuple[int, float]]:
    """A scalar's (step, value) points as TensorBoard shows them."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(point.step, point.value) for point in events.Scalars(tag)]


def test_a_replica_group_that_loses_a_tower_takes_a_healthy_groups_weights_and_loses_no_step(ray_session, patterns):
    """Two replica groups; kill -9 of group 1's tower 0 mid-step: group 1 is rebuilt from group 0's
    weights and momentum, only the failed step is redone (no snapshot), and the run ends with the
    weights of one that was never interrupted."""
    spec = run_spec(
        "demo",
        {"width": 0.125, "epochs": 1, "batch_size": 16, "steps_per_epoch": 8, "snapshot_every": 3, "replicas": 2},
    )
    untouched = []
    straight = train(patterns, spec, on_publish=lambda step, state: untouched.append(state))
    engine = ModelParallelAlexNet(num_classes=patterns.num_classes, width=0.125, init="kaiming", replicas=2)
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event.kind == "step" and event.step == 5 and not killed:  # step 6 has just been submitted
            killed.append(engine.tower_info[2]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    try:
        result = train(patterns, spec, on_event=on_event, engine=engine, on_publish=lambda step, state: None)
        weights = engine.state_dict()
        group0, group1 = engine.replica_checksums()
    finally:
        engine.shutdown()
    [recovered] = [e for e in events if e.kind == "recovered"]
    assert f"replaced group 1 tower 0 (died; pid {killed[0]}" in recovered.message
    assert (
        "every group took group 0's weights and momentum: no step lost, 1 failed step(s) to redo from step 5"
        in recovered.message
    )
    steps = [e.step for e in events if e.kind == "step"]
    assert steps[steps.index(5) + 1] == 6  # the run went on from where it was, not from the snapshot at step 3
    assert result.state == "finished" and result.restarts == 1 and result.steps == straight.steps == 8
    assert group0 == group1
    assert_same_weights(weights, untouched[-1])


def assert_same_weights(ours: dict, theirs: dict, rtol: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        scale = theirs[name].abs().max().item() or 1.0
        assert (ours[name] - theirs[name]).abs().max().item() <= rtol * scale, name


def test_a_stopped_run_resumed_from_its_checkpoint_ends_exactly_as_a_straight_run(ray_session, patterns, tmp_path):
    """N steps straight equal N/2, a stop, a resume from the checkpoint, and the rest: the weights,
    momentum, schedule (plateau counters), data position and random streams all come back."""
    from coordinator.training import ResumeMismatch, load_checkpoint, resume_spec
    from coordinator.training.checkpoints import check_resumable

    spec = run_spec(
        "demo", {"width": 0.125, "epochs": 3, "batch_size": 16, "steps_per_epoch": 3, "schedule": "plateau"}
    )
    straight_weights, resumed_weights, stop = [], [], threading.Event()
    straight = train(patterns, spec, on_publish=lambda step, state: straight_weights.append(state))
    first = train(
        patterns,
        spec,
        stop=stop,
        checkpoint_dir=tmp_path,
        on_event=lambda e: e.kind == "step" and e.step == 5 and stop.set(),
    )
    payload = load_checkpoint(tmp_path)  # the folder means its latest
    assert first.state == "stopped" and payload["step"] == first.steps in (5, 6)  # mid-way through the second epoch
    assert (payload["epochs_done"], payload["position"]) == (1, first.steps - 3)
    assert payload["schedule"]["best"] < 1 and payload["engine_steps"] == first.steps
    old = written_before_run_options(payload, tmp_path / "old.pt")  # an older server's checkpoint resumes too
    second = train(
        patterns,
        resume_spec(load_checkpoint(old), {"epochs": "3"}),
        resume=old,
        checkpoint_dir=tmp_path,
        on_publish=lambda step, state: resumed_weights.append(state),
    )
    assert second.state == "finished" and second.steps == straight.steps == 9 and second.epochs_done == 3
    assert second.top1 == straight.top1 and second.loss == pytest.approx(straight.loss, rel=1e-5)
    assert_same_weights(resumed_weights[-1], straight_weights[-1])
    assert load_checkpoint(tmp_path)["step"] == 9 and load_checkpoint(tmp_path)["options"]["epochs"] == 3

    other = generate(tmp_path / "other", train_per_class=8, val_per_class=2)  # same classes, other files
    with pytest.raises(ResumeMismatch, match="same classes but other files"):
        check_resumable(payload, open_dataset(other / "train", other / "val"))
    with pytest.raises(ResumeMismatch, match="network's shape differs: the checkpoint has width 0.125"):
        resume_spec(payload, {"width": "0.25"})
    with pytest.raises(ValueError, match="lr cannot change"):
        resume_spec(payload, {"lr": "0.1"})


def written_before_run_options(payload: dict, path):
    """The checkpoint as a server wrote it before run options had a section of their own: in its recipe."""
    old = {name: value for name, value in payload.items() if name not in ("options", "path")}
    old["recipe"] = {**payload["recipe"], **payload["options"]}
    torch.save(old, path)
    return path


# A checkpoint's recipe as written before run options had a section of their own (lists, as torch.save keeps them).
OLD_RECIPE = {
    "epochs": 5,
    "batch_size": 64,
    "lr": 0.003,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "dropout": 0.5,
    "init": "kaiming",
    "normalise": True,
    "schedule": "step",
    "lr_epochs": [4],
    "patience": 1,
    "max_drops": 3,
    "steps_per_epoch": 0,
    "val_images": 0,
    "ten_crop": False,
    "val_fraction": 0.1,
    "seed": 0,
    "width": 0.125,
    "publish_every": 10,
    "transport": "object_store",
    "replicas": 1,
    "precision": "float32",
    "snapshot_every": 7,
    "checkpoint_every": 0,
    "keep_checkpoints": 2,
    "max_restarts": 1,
}


def test_a_resume_keeps_the_recipe_and_may_change_any_run_option():
    """No list of resumable fields: every run option may change, no recipe field may (naming the
    value the run has is no change). An older checkpoint's run options are read from its recipe."""
    from coordinator.training import ResumeMismatch, resume_spec

    payload = {"recipe": dict(OLD_RECIPE)}
    everything = {name: str(OLD_RECIPE[name] + 1) for name in RUN_OPTIONS if isinstance(OLD_RECIPE[name], int)}
    recipe, options = resume_spec(payload, {**everything, "transport": "gloo", "precision": "bfloat16", "replicas": 2})
    assert (recipe.width, recipe.lr, recipe.lr_epochs, recipe.init, recipe.batch_size) == (
        0.125,
        0.003,
        (4,),
        "kaiming",
        64,
    )
    assert (options.epochs, options.snapshot_every, options.keep_checkpoints, options.max_restarts) == (6, 8, 3, 2)
    assert (options.transport, options.precision, options.replicas) == ("gloo", "bfloat16", 2)
    assert resume_spec(payload).options == RunOptions(**{n: OLD_RECIPE[n] for n in RUN_OPTIONS})
    assert resume_spec(payload, {"lr": "0.003", "width": "0.125"}).recipe.lr == 0.003
    with pytest.raises(ValueError, match="a resumed run keeps its recipe: lr, seed cannot change"):
        resume_spec(payload, {"lr": "0.01", "seed": "3"})
    with pytest.raises(ResumeMismatch, match="the checkpoint has width 0.125, the request asks for 0.25"):
        resume_spec(payload, {"width": "0.25"})
    with pytest.raises(ValueError, match="unknown override colour"):
        resume_spec(payload, {"colour": "red"})


class WeightsOnly:
    """What a checkpoint reads of an engine (weights, momentum, rate), here big enough that a
    write takes long enough to be killed halfway."""

    def __init__(self, megabytes: int, value: float):
        self.weights = {"w": torch.full((megabytes * 2**18,), value)}
        self.lr, self.steps = 0.01, int(value)

    def state_dict(self, group=0):
        return self.weights

    def optimizer_state(self, group=0):
        return [{}, {}]


def saved_by(folder, steps_and_top1, keep, megabytes=1):
    from types import SimpleNamespace

    from coordinator.data import ColourStats
    from coordinator.training.checkpoints import save_checkpoint
    from coordinator.training.recipe import StepSchedule
    from coordinator.training.recovery import take_snapshot

    dataset = SimpleNamespace(
        classes=["a", "b"], labels=["a", "b"], stats=ColourStats.imagenet(), fingerprint=lambda: "f"
    )
    for step, top1 in steps_and_top1:
        snapshot = take_snapshot(WeightsOnly(megabytes, step), step, 0, step, StepSchedule(0.01, [1]), top1, math.nan)
        save_checkpoint(folder, snapshot, dataset, run_spec("demo"), keep=keep)


def test_checkpoints_keep_the_last_ones_and_the_most_accurate(tmp_path):
    from coordinator.training.checkpoints import read_index

    saved_by(tmp_path, [(10, 0.30), (20, 0.55), (30, 0.40), (40, math.nan), (50, 0.45)], keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt") if not p.is_symlink()) == [
        "checkpoint-step0000020.pt",  # the best validation accuracy
        "checkpoint-step0000040.pt",
        "checkpoint-step0000050.pt",  # the last two
    ]
    assert {v["step"] for v in read_index(tmp_path).values()} == {20, 40, 50}
    latest = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert latest["step"] == 50 and latest["top1"] == 0.45 and latest["state_dict"]["w"][0] == 50


KILL_DURING_WRITE = """
import sys
sys.path.insert(0, {tests!r})
from test_training import saved_by
saved_by({folder!r}, [(1, 0.5)], keep=3)
print("first", flush=True)
saved_by({folder!r}, [(2, 0.6)], keep=3, megabytes=1500)
"""


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    import subprocess
    import sys

    script = KILL_DURING_WRITE.format(tests=os.path.dirname(__file__), folder=str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "first"
    partial = tmp_path / "checkpoint-step0000002.pt.tmp"
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)  # halfway through writing 1.5 GB
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert 0 < partial.stat().st_size < 1500 * 2**20  # it really was cut short
    latest = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert latest["step"] == 1 and latest["state_dict"]["w"][0] == 1  # the previous checkpoint, whole
    saved_by(tmp_path, [(3, 0.7)], keep=3)  # the next write clears what the killed one left
    assert not partial.exists() and torch.load(tmp_path / "latest.pt", weights_only=False)["step"] == 3
