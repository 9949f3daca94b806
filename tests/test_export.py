"""Models that leave the server, and come back: ONNX in onnxruntime, torch.export's program in a fresh
process, and safetensors back into the reference, each giving what Classify gives; jobs that start
from a file or a model version (fine-tuning, tests/test_finetune.py); and a version of each published
variant served (tests/test_variants.py)."""

import dataclasses
import json
import subprocess
import sys
import threading
from types import SimpleNamespace

import grpc
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load, save
from test_variants import served_as_its_own_network

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from test_service import finish, wait_for
from towers import AlexNet, NetConfig
from towers.portable import PortableError, ShapeMismatch, check_fits, fitted, from_safetensors, to_safetensors

WIDTH = 0.125


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    """A server whose served version is a trained job's last; that job (it checkpointed), which started
    from a file of six classes (fine-tuning), and what it said as it started; and its last version (weights and all).
    Tests that publish others leave it served again, or say what they leave served."""
    base = tmp_path_factory.getbasetemp()
    root = generate(tmp_path_factory.mktemp("export") / "patterns", train_per_class=8, val_per_class=2)
    six = AlexNet(num_classes=6, width=WIDTH, init="kaiming", seed=5)  # as an exported file holds it
    source = tmp_path_factory.mktemp("source") / "six.safetensors"
    source.write_bytes(to_safetensors(six.state_dict(), six.config))
    options = ServeOptions(port=0, metrics_port=-1, width=WIDTH, max_exports=1)
    srv = Server(dataclasses.replace(options, data_roots=[str(base)], checkpoint_roots=[str(base)])).start()
    client = AlexNetClient(f"127.0.0.1:{srv.port}", timeout=120)
    try:
        client.wait_ready()
        job = client.train(
            root / "train", overrides=SHORT, checkpoint_dir=tmp_path_factory.mktemp("ckpt"), init_from=str(source)
        )
        said = running_message(client, job.job_id)
        job = finish(client, job.job_id)
        assert job.state == pb.FINISHED
        wait_for(lambda: client.info().model_version == job.model_version)  # the batcher has taken it up
        yield SimpleNamespace(
            server=srv,
            client=client,
            job=job,
            source=source,
            said=said,
            root=root,
            version=srv.classifier.current,
        )
    finally:
        client.close()
        srv.stop()


SHORT = {"width": str(WIDTH), "epochs": "1", "batch_size": "8", "steps_per_epoch": "3"}


def running_message(client, job_id: str) -> str:
    """What a job said as it started running (its first RUNNING event), watched from its start."""
    events = list(client.watch(job_id))
    return next(e.message for e in events if e.state == pb.RUNNING)


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


def test_onnx_in_onnxruntime_gives_classifys_probabilities_at_batch_1_and_8(world, tmp_path):
    client = world.client
    path = tmp_path / "alexnet.onnx"
    last = client.export(path, "onnx")
    session = onnxruntime.InferenceSession(str(path))
    for batch in (1, 8):  # one dynamic batch dimension
        x = images(batch)
        expected, version = classified(client, x)
        [got] = session.run(["probabilities"], {"images": x})
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4
    assert last.file_name == f"alexnet-v{version}.onnx" and path.stat().st_size == last.total_bytes
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["model_version"] == str(version) and meta["precision"] == "float32"
    assert len(json.loads(meta["labels"])) == 10 and "[batch, 3, 227, 227]" in meta["input"] and "mean" in meta


def test_the_torch_export_program_gives_the_same_in_a_fresh_process(world, tmp_path):
    client = world.client
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


def test_safetensors_round_trips_bit_exact_into_the_reference(world, tmp_path):
    """The served version's weights, bit for bit (into the engine too: tests/test_variants.py)."""
    client = world.client
    client.export(tmp_path / "w.safetensors", "safetensors")
    served, version = world.server.classifier.engine.state_dict(), client.info().model_version
    state, config, meta = from_safetensors((tmp_path / "w.safetensors").read_bytes())
    assert meta["model_version"] == version and len(meta["labels"]) == 10
    assert all(torch.equal(state[key], value) for key, value in served.items()) and state.keys() == served.keys()
    reference = AlexNet(num_classes=config.num_classes, width=config.width, network=config.network)
    reference.load_state_dict(state)
    assert all(torch.equal(reference.state_dict()[key], value) for key, value in served.items())


def test_a_jobs_checkpoint_exports_from_the_server_and_locally_as_its_last_version(world, tmp_path):
    from client.cli import main

    target = ["--target", f"127.0.0.1:{world.server.port}"]
    as_safetensors = ["--format", "safetensors", "-o"]
    assert main([*target, "export", world.job.job_id, *as_safetensors, str(tmp_path / "job.safetensors")]) == 0
    assert main(["export", world.job.checkpoint, *as_safetensors, str(tmp_path / "local.safetensors")]) == 0
    for name in ("job.safetensors", "local.safetensors"):
        state, _, _ = from_safetensors((tmp_path / name).read_bytes())
        assert state.keys() == world.version.state.keys()
        assert all(torch.equal(state[key], value) for key, value in world.version.state.items()), name


def test_a_job_started_from_a_file_says_so(world):
    """The world's job started from a file of six classes, for ten (a job from a version: below)."""
    assert f"initialised from {world.source}; fc8 starts afresh for 10 classes" in world.said


def test_a_published_version_of_each_variant_is_served_by_towers_of_its_own_network(world, tmp_path):
    """Caffe's from a job that trains it (a job's versions name its recipe's network), started from the
    version served now, as it says (the variants share their shapes); the 2012 code's published as a
    job publishes, without the training, to keep the test short. The serving towers are rebuilt in
    place for each; the world's version is served again at the end."""
    server, client, served = world.server, world.client, world.client.info().model_version
    pids = [info["pid"] for info in server.classifier.engine.tower_info]
    caffe = {**SHORT, "network": "caffe", "steps_per_epoch": "2", "publish_every": "1"}
    job = client.train(world.root / "train", overrides=caffe, init_from=f"version:{served}")
    assert running_message(client, job.job_id).endswith(f"initialised from model version {served}, served now")
    job = client.get(job.job_id)
    assert job.state == pb.FINISHED and job.model_version > 0, job.error
    wait_for(lambda: client.info().model_version == job.model_version)
    served_as_its_own_network(server, client, "caffe", tmp_path)

    net = dict(num_classes=10, width=WIDTH, network="cuda-convnet-2012")
    weights = AlexNet(**net, seed=5, init="pytorch").state_dict()  # activations that LRN acts on
    version = server.jobs.publish(dataclasses.replace(world.version, state=weights, net=net))
    wait_for(lambda: client.info().model_version == version)
    served_as_its_own_network(server, client, "cuda-convnet-2012", tmp_path)
    assert [info["pid"] for info in server.classifier.engine.tower_info] == pids  # rebuilt in place

    version = server.jobs.publish(dataclasses.replace(world.version))
    wait_for(lambda: client.info().model_version == version)


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
    srv, client = world.server, world.client
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
