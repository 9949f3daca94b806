"""Models that leave the server: ONNX in onnxruntime, torch.export's program in a fresh process, and
safetensors back into the reference and the engine, each giving what Classify gives."""

import dataclasses
import json
import subprocess
import sys
import threading

import grpc
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load, save

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator import ModelParallelAlexNet
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from test_service import finish, wait_for
from towers import AlexNet, NetConfig
from towers.portable import PortableError, ShapeMismatch, check_fits, fitted, from_safetensors, to_safetensors

WIDTH = 0.125


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    """A server whose served version is a trained job's last, and that job (it checkpointed)."""
    base = tmp_path_factory.getbasetemp()
    root = generate(tmp_path_factory.mktemp("export") / "patterns", train_per_class=8, val_per_class=2)
    options = ServeOptions(port=0, metrics_port=-1, width=WIDTH, max_exports=1)
    srv = Server(dataclasses.replace(options, data_roots=[str(base)], checkpoint_roots=[str(base)])).start()
    client = AlexNetClient(f"127.0.0.1:{srv.port}", timeout=120)
    try:
        client.wait_ready()
        overrides = {"width": str(WIDTH), "epochs": "1", "batch_size": "8", "steps_per_epoch": "3"}
        job = client.train(root / "train", overrides=overrides, checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
        job = finish(client, job.job_id)
        assert job.state == pb.FINISHED
        wait_for(lambda: client.info().model_version == job.model_version)  # the batcher has taken it up
        yield srv, client, job
    finally:
        client.close()
        srv.stop()


def images(batch: int, seed: int = 0) -> np.ndarray:
    """Preprocessed images, as Classify's tensors take them: pixels minus the mean, about +-1 here (demo preset)."""
    return np.random.default_rng(seed).normal(0, 1, (batch, 3, 227, 227)).astype(np.float32)


def classified(client, batch: np.ndarray) -> tuple[np.ndarray, int]:
    """Classify's probabilities for every class of every image, and the version that answered."""
    response = client.classify(list(batch), top_k=10)
    probabilities = np.zeros((len(batch), 10), dtype=np.float32)
    for row, result in zip(probabilities, response.results):
        for prediction in result.top:
            row[prediction.class_index] = prediction.probability
    return probabilities, response.model_version


@pytest.mark.parametrize("batch", [1, 8])
def test_onnx_in_onnxruntime_gives_classifys_probabilities(world, tmp_path, batch):
    _, client, job = world
    path = tmp_path / "alexnet.onnx"
    last = client.export(path, "onnx")
    assert last.file_name == f"alexnet-v{job.model_version}.onnx" and path.stat().st_size == last.total_bytes
    session = onnxruntime.InferenceSession(str(path))
    x = images(batch)
    expected, version = classified(client, x)
    [got] = session.run(["probabilities"], {"images": x})
    assert version == job.model_version and got.shape == (batch, 10)
    assert np.abs(got - expected).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["model_version"] == str(job.model_version) and meta["precision"] == "float32"
    assert len(json.loads(meta["labels"])) == 10 and "[batch, 3, 227, 227]" in meta["input"] and "mean" in meta


def test_the_torch_export_program_gives_the_same_in_a_fresh_process(world, tmp_path):
    _, client, _ = world
    client.export(tmp_path / "alexnet.pt2", "torch-export")
    x = images(8, seed=1)
    np.save(tmp_path / "x.npy", x)
    expected, _ = classified(client, x)
    script = (
        "import sys, numpy as np, torch; p = torch.export.load(sys.argv[1]).module(); "
        "np.save(sys.argv[3], p(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "alexnet.pt2"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        timeout=300,
    )
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() < 1e-4


def test_safetensors_round_trips_bit_exact_into_the_reference_and_the_engine(world, tmp_path):
    srv, client, job = world
    client.export(tmp_path / "w.safetensors", "safetensors")
    served = srv.classifier.engine.state_dict()
    state, config, meta = from_safetensors((tmp_path / "w.safetensors").read_bytes())
    assert meta["model_version"] == job.model_version and len(meta["labels"]) == 10
    assert all(torch.equal(state[key], value) for key, value in served.items()) and state.keys() == served.keys()
    reference = AlexNet(num_classes=config.num_classes, width=config.width)
    reference.load_state_dict(state)
    assert all(torch.equal(reference.state_dict()[key], value) for key, value in served.items())
    with ModelParallelAlexNet(num_classes=config.num_classes, width=config.width) as engine:
        engine.load_state_dict(state)
        assert all(torch.equal(engine.state_dict()[key], value) for key, value in served.items())
    # A job's checkpoint exports too, and from the CLI: the same weights as the version it published last.
    from client.cli import main

    assert (
        main(
            [
                "--target",
                f"127.0.0.1:{srv.port}",
                "export",
                job.job_id,
                "--format",
                "safetensors",
                "-o",
                str(tmp_path / "job.safetensors"),
            ]
        )
        == 0
    )
    from_job, _, _ = from_safetensors((tmp_path / "job.safetensors").read_bytes())
    assert all(torch.equal(from_job[key], value) for key, value in served.items())
    assert main(["export", job.checkpoint, "--format", "safetensors", "-o", str(tmp_path / "local.safetensors")]) == 0
    assert (tmp_path / "local.safetensors").read_bytes() != b"" and from_safetensors(
        (tmp_path / "local.safetensors").read_bytes()
    )[0].keys() == served.keys()


def test_a_file_that_does_not_fit_names_the_first_mismatch():
    wide = AlexNet(num_classes=10, width=0.25)
    data = to_safetensors(wide.state_dict(), wide.config)
    state, renewed = fitted(from_safetensors(data)[0], NetConfig(num_classes=4, width=0.25))  # all but fc8
    assert renewed and "fc8.weight" not in state and torch.equal(state["conv1.weight"], wide.conv1.weight)
    with pytest.raises(PortableError, match="truncated"):
        from_safetensors(data[:20])
    with pytest.raises(PortableError, match="not a readable safetensors file"):
        from_safetensors(b"GIF89a" + bytes(100))
    with pytest.raises(PortableError, match="not one of alexnet-mp's"):
        from_safetensors(save({"w": torch.zeros(2)}))
    narrow = AlexNet(num_classes=10, width=0.125)
    tensors = load(to_safetensors(narrow.state_dict(), narrow.config))  # as the file holds them, tower by tower
    with pytest.raises(ShapeMismatch, match=r"tower0.conv1.weight has shape \[6, 3, 11, 11\], the network needs \[12,"):
        check_fits(tensors, wide.config)


def test_exports_beyond_the_cap_and_without_a_format_are_refused(world, tmp_path):
    srv, client, _ = world
    srv.exporter.acquire()  # the one export this server runs at once
    try:
        with pytest.raises(grpc.RpcError) as crowded:
            client.export(tmp_path / "refused.onnx", "onnx")
        assert crowded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 exports are running" in crowded.value.details() and not list(tmp_path.iterdir())  # nothing left
    finally:
        srv.exporter.release()
    with pytest.raises(grpc.RpcError) as unset:
        list(client.model.ExportModel(pb.ExportRequest(), timeout=30))
    assert unset.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format must be ONNX" in unset.value.details()
    results = []
    threads = [threading.Thread(target=lambda: results.append(_try_export(client))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "OK" in results  # at least one ran; the other ran after it or was refused, never hung


def _try_export(client) -> str:
    try:
        list(client.model.ExportModel(pb.ExportRequest(format=pb.SAFETENSORS), timeout=120))
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
