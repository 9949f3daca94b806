"""What the network learns, as users watch it: TensorBoard logs read back with tensorboard's own
reader and served by the real `tensorboard` server, and the paper's Figure 3 of each tower's kernels."""

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coordinator import ModelParallelAlexNet
from coordinator.data import open_dataset
from coordinator.data.patterns import generate
from coordinator.training import run_spec, train
from coordinator.training.board import (
    KERNELS_IMAGE,
    STEP_SCALARS,
    VALIDATION_SCALARS,
    colour_tag,
    histogram_tag,
)
from towers import NetConfig
from towers.figures import colour_shares, colour_specialisation, figure3, figure3_layout

WIDTH = 0.125  # 6 conv1 kernels per tower
STEPS_PER_EPOCH, EPOCHS, PUBLISH_EVERY = 4, 2, 2
EVERYTHING = {"scalars": 0, "images": 0, "histograms": 0}  # EventAccumulator keeps every point, not a sample


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    """A short run with a TensorBoard log, and its towers' conv1 kernels at the end."""
    root = generate(tmp_path_factory.mktemp("patterns") / "p", train_per_class=8, val_per_class=2)
    dataset = open_dataset(root / "train", root / "val")
    spec = run_spec(
        "demo",
        {
            "width": WIDTH,
            "epochs": EPOCHS,
            "batch_size": 8,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "publish_every": PUBLISH_EVERY,
        },
    )
    log_dir = tmp_path_factory.mktemp("runs") / "first"
    engine = ModelParallelAlexNet(num_classes=dataset.num_classes, width=WIDTH, init="kaiming")
    try:
        result = train(dataset, spec, engine=engine, log_dir=log_dir, on_publish=lambda step, state: None)
        kernels = engine.tower_weights("conv1")
    finally:
        engine.shutdown()
    events = EventAccumulator(str(log_dir), size_guidance=EVERYTHING)
    events.Reload()
    return result, kernels, log_dir, events


def test_every_step_and_validation_has_one_point_of_each_scalar(run):
    result, _, _, events = run
    steps = list(range(1, result.steps + 1))
    assert result.steps == STEPS_PER_EPOCH * EPOCHS
    for tag in STEP_SCALARS:
        assert [point.step for point in events.Scalars(tag)] == steps, tag
    assert [p.value for p in events.Scalars("train/learning_rate")] == pytest.approx(
        [0.003] * result.steps
    )  # demo preset
    assert all(p.value > 0 for p in events.Scalars("train/exchange_bytes"))
    validations = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    for tag in VALIDATION_SCALARS:
        assert [point.step for point in events.Scalars(tag)] == validations, tag
        assert all(0 <= point.value <= 1 for point in events.Scalars(tag))
    assert events.Scalars("validation/top1")[-1].value == pytest.approx(result.top1)


def test_figure3_is_logged_at_the_start_and_every_epoch_from_the_towers_kernels(run):
    _, kernels, _, events = run
    images = events.Images(KERNELS_IMAGE)
    assert [image.step for image in images] == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    layout = figure3_layout([len(k) for k in kernels], kernels[0].shape[-1])
    assert all((image.width, image.height) == (layout.width, layout.height) for image in images)
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(last, figure3(kernels))  # the run's final kernels, tower 0's block on top
    for tower, weight in enumerate(kernels):
        colours = events.Scalars(colour_tag(tower))
        assert [c.step for c in colours] == [image.step for image in images]
        assert colours[-1].value == pytest.approx(colour_specialisation(weight), abs=1e-6)


def test_weight_histograms_are_per_tower_for_every_layer(run):
    _, kernels, _, events = run
    config = NetConfig(num_classes=10, width=WIDTH)
    tags = set(events.Tags()["histograms"])
    expected = {
        histogram_tag(t, f"{s.name}.{part}") for t in range(2) for s in config.shapes for part in ("weight", "bias")
    }
    assert tags == expected
    # At the first published version (step 2); the next comes HISTOGRAM_EVERY steps later, after this run.
    conv1 = events.Histograms(histogram_tag(1, "conv1.weight"))
    assert [h.step for h in conv1] == [PUBLISH_EVERY]
    histogram = conv1[0].histogram_value
    assert histogram.num == kernels[1].numel() and sum(histogram.bucket) == histogram.num


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_tensorboard_server_serves_the_runs_loss_curve(run):
    """The real `tensorboard` command on loopback, read through its HTTP API as its web page does."""
    result, _, log_dir, events = run
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("tensorboard")),
        "--logdir",
        str(log_dir.parent),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, runs = time.monotonic() + 60, []
        while time.monotonic() < deadline and log_dir.name not in runs:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                runs = json.load(urllib.request.urlopen(f"{base}/data/runs", timeout=5))
            except OSError:
                pass
            time.sleep(0.3)
        assert log_dir.name in runs
        url = f"{base}/data/plugin/scalars/scalars?run={log_dir.name}&tag=train/loss"
        served = json.load(urllib.request.urlopen(url, timeout=10))  # [[wall time, step, value], ...]
        assert [step for _, step, _ in served] == list(range(1, result.steps + 1))
        assert [value for _, _, value in served] == pytest.approx([p.value for p in events.Scalars("train/loss")])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_figure3_puts_each_towers_kernels_in_its_own_block():
    grey = torch.randn(6, 1, 11, 11).expand(6, 3, 11, 11)  # R = G = B in every kernel
    colour = torch.randn(6, 3, 11, 11)
    colour = colour - colour.mean(dim=1, keepdim=True)  # channels cancel: no grey at all
    picture = figure3([grey, colour], columns=4, scale=2)
    layout = figure3_layout([6, 6], 11, columns=4, scale=2)
    assert picture.shape == (layout.height, layout.width, 3)
    assert (layout.width, layout.height) == (2 + 4 * 24, 2 * (2 + 2 * 24) + 12)  # two rows of four per tower
    for tower, origins in enumerate(layout.origins):
        for top, left in origins:
            block = picture[top : top + layout.cell, left : left + layout.cell].astype(int)
            channels_differ = np.abs(block - block[..., :1]).max()
            assert (channels_differ == 0) if tower == 0 else (channels_differ > 0), (tower, top, left)
    assert colour_specialisation(grey) == 0.0 and colour_specialisation(colour) == pytest.approx(1.0)
    assert colour_shares(torch.randn(2000, 3, 11, 11)).mean() == pytest.approx(2 / 3, abs=0.01)  # random kernels


def test_figure3_refuses_weights_that_are_not_rgb_kernels():
    with pytest.raises(ValueError, match=r"tower 1's conv1 weight must be \[kernels, 3, k, k\], got \[6, 4, 11, 11\]"):
        figure3([torch.zeros(6, 3, 11, 11), torch.zeros(6, 4, 11, 11)])
