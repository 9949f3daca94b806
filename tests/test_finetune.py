"""Starting a run from a model's weights (fine-tuning): the run's first step sees the file's
layers, fc8 starts afresh for another class count, and weights of another network are refused."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.data import open_dataset
from coordinator.data.patterns import KINDS, generate
from coordinator.service import ServeOptions, Server
from coordinator.training import run_spec, train
from coordinator.training.board import KERNELS_IMAGE
from test_service import wait_for
from towers import AlexNet, NetConfig
from towers.figures import figure3
from towers.portable import ShapeMismatch, fitted, to_safetensors

WIDTH = 0.125


@pytest.fixture(scope="module")
def source():
    """A model of six classes, as a file would give it."""
    return AlexNet(num_classes=6, width=WIDTH, init="kaiming", seed=7).state_dict()


def test_a_run_starts_from_the_files_layers_with_fc8_afresh(ray_session, source, tmp_path):
    root = generate(tmp_path / "patterns", train_per_class=4, val_per_class=1)  # ten classes
    spec = run_spec("demo", {"width": WIDTH, "epochs": 1, "batch_size": 8, "steps_per_epoch": 2})
    start, renewed = fitted(source, NetConfig(num_classes=10, width=WIDTH))
    assert renewed and "fc8.weight" not in start and start.keys() == source.keys() - {"fc8.weight", "fc8.bias"}
    states = []
    result = train(
        open_dataset(root / "train", root / "val"),
        spec,
        init_state=start,
        log_dir=tmp_path / "log",
        on_publish=lambda step, state: states.append(state),
    )
    assert result.steps == 2 and states[-1]["fc8.weight"].shape == (10, 4096 * WIDTH)
    # The run's first Figure 3, drawn before its first step, is the file's conv1.
    events = EventAccumulator(str(tmp_path / "log"), size_guidance={"images": 0})
    events.Reload()
    first = events.Images(KERNELS_IMAGE)[0]
    drawn = np.asarray(Image.open(io.BytesIO(first.encoded_image_string)).convert("RGB"))
    assert first.step == 0 and np.array_equal(drawn, figure3(list(torch.split(source["conv1.weight"], [6, 6]))))
    assert not torch.equal(states[-1]["conv1.weight"], source["conv1.weight"])  # and then it trained


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    base = [str(tmp_path_factory.getbasetemp())]
    srv = Server(ServeOptions(port=0, metrics_port=-1, width=WIDTH, data_roots=base, checkpoint_roots=base)).start()
    with AlexNetClient(f"127.0.0.1:{srv.port}", timeout=120) as client:
        client.wait_ready()
        yield srv, client
    srv.stop()


def test_jobs_start_from_a_file_or_a_model_version_and_say_so(server, tmp_path):
    _, client = server
    ten = AlexNet(num_classes=10, width=WIDTH, init="kaiming", seed=5)  # as an exported file holds it
    (tmp_path / "ten.safetensors").write_bytes(to_safetensors(ten.state_dict(), ten.config))
    root = generate(tmp_path / "patterns", train_per_class=4, val_per_class=1)
    for split in ("train", "val"):
        for kind in list(KINDS)[:4]:
            shutil.copytree(root / split / kind, tmp_path / "four" / split / kind)
    short = {"width": str(WIDTH), "epochs": "1", "batch_size": "8", "steps_per_epoch": "1"}

    def started(init_from: str) -> tuple[str, pb.TrainingJob]:
        job = client.train(tmp_path / "four" / "train", overrides=short, init_from=init_from)
        events = list(client.watch(job.job_id))
        assert events[-1].state == pb.FINISHED
        return next(e.message for e in events if e.state == pb.RUNNING), client.get(job.job_id)

    said, tuned = started(str(tmp_path / "ten.safetensors"))
    assert f"initialised from {tmp_path / 'ten.safetensors'}; fc8 starts afresh for 4 classes" in said
    wait_for(lambda: client.info().model_version == tuned.model_version)
    said, _ = started(f"version:{tuned.model_version}")
    assert said.endswith(f"initialised from model version {tuned.model_version}, served now")  # four classes: all


def test_weights_of_another_network_are_refused_naming_the_first_mismatch(source):
    same, renewed = fitted(source, NetConfig(num_classes=6, width=WIDTH))
    assert not renewed and same.keys() == source.keys()
    with pytest.raises(ShapeMismatch, match=r"conv1.weight has shape \[12, 3, 11, 11\], this network needs \[24,"):
        fitted(source, NetConfig(num_classes=6, width=0.25))
    with pytest.raises(ShapeMismatch, match="the file has no conv2.bias"):
        fitted({k: v for k, v in source.items() if k != "conv2.bias"}, NetConfig(num_classes=6, width=WIDTH))
