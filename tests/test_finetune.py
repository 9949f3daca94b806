"""Starting a run from a model's weights (fine-tuning): the run's first step sees the file's
layers, fc8 starts afresh for another class count, and weights of another network are refused."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coordinator.data import open_dataset
from coordinator.data.patterns import generate
from coordinator.training import recipe, train
from coordinator.training.board import KERNELS_IMAGE
from towers import AlexNet, NetConfig
from towers.figures import figure3
from towers.portable import ShapeMismatch, fitted

WIDTH = 0.125


@pytest.fixture(scope="module")
def source():
    """A model of six classes, as a file would give it."""
    return AlexNet(num_classes=6, width=WIDTH, init="kaiming", seed=7).state_dict()


def test_a_run_starts_from_the_files_layers_with_fc8_afresh(ray_session, source, tmp_path):
    root = generate(tmp_path / "patterns", train_per_class=4, val_per_class=1)  # ten classes
    plan = recipe("demo", {"width": WIDTH, "epochs": 1, "batch_size": 8, "steps_per_epoch": 2})
    start, renewed = fitted(source, NetConfig(num_classes=10, width=WIDTH))
    assert renewed and "fc8.weight" not in start and start.keys() == source.keys() - {"fc8.weight", "fc8.bias"}
    states = []
    result = train(open_dataset(root / "train", root / "val"), plan, init_state=start, log_dir=tmp_path / "log",
                   on_publish=lambda step, state: states.append(state))  # fmt: skip
    assert result.steps == 2 and states[-1]["fc8.weight"].shape == (10, 4096 * WIDTH)
    # The run's first Figure 3, drawn before its first step, is the file's conv1.
    events = EventAccumulator(str(tmp_path / "log"), size_guidance={"images": 0})
    events.Reload()
    first = events.Images(KERNELS_IMAGE)[0]
    drawn = np.asarray(Image.open(io.BytesIO(first.encoded_image_string)).convert("RGB"))
    assert first.step == 0 and np.array_equal(drawn, figure3(list(torch.split(source["conv1.weight"], [6, 6]))))
    assert not torch.equal(states[-1]["conv1.weight"], source["conv1.weight"])  # and then it trained


def test_weights_of_another_network_are_refused_naming_the_first_mismatch(source):
    same, renewed = fitted(source, NetConfig(num_classes=6, width=WIDTH))
    assert not renewed and same.keys() == source.keys()
    with pytest.raises(ShapeMismatch, match=r"conv1.weight has shape \[12, 3, 11, 11\], this network needs \[24,"):
        fitted(source, NetConfig(num_classes=6, width=0.25))
    with pytest.raises(ShapeMismatch, match="the file has no conv2.bias"):
        fitted({k: v for k, v in source.items() if k != "conv2.bias"}, NetConfig(num_classes=6, width=WIDTH))
