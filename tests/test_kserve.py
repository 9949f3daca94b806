"""The Open Inference Protocol (KServe v2) on the server's port: the unmodified Triton client, in a
process of its own (tests/triton_probe.py), and our own generated stubs for the bad requests."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from alexnet_api.inference_v2 import open_inference_grpc_pb2 as v2
from alexnet_api.inference_v2 import open_inference_grpc_pb2_grpc as v2_rpc
from client import AlexNetClient
from coordinator.service import ServeOptions, Server
from test_service import jpeg_bytes, scrape

PROBE = Path(__file__).with_name("triton_probe.py")
WIDTH, MAX_BATCH, SIZE = 0.125, 4, 227


@pytest.fixture(scope="module")
def server(ray_session):
    srv = Server(ServeOptions(port=0, metrics_port=0, width=WIDTH, max_batch=MAX_BATCH, max_delay_ms=1)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield v2_rpc.GRPCInferenceServiceStub(channel)


def test_the_triton_client_agrees_with_classify(server, tmp_path):
    tensors = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "tensors.npy", tensors)
    images = {"a.jpg": jpeg_bytes(3), "b.png": jpeg_bytes(4, "PNG")}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    run = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            f"127.0.0.1:{server.port}",
            str(tmp_path / "tensors.npy"),
            *(str(tmp_path / name) for name in images),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"] and not seen["other_model_ready"]
    assert seen["server"]["name"] == "alexnet-mp" and "classification" in seen["server"]["extensions"]
    metadata = seen["metadata"]
    assert metadata["name"] == "alexnet" and metadata["versions"] == ["0"]
    assert metadata["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "3", "227", "227"]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    status, message = seen["old_version"]
    assert status == "StatusCode.NOT_FOUND" and "serves version 0" in message

    with AlexNetClient(f"127.0.0.1:{server.port}", timeout=60) as ours:  # alexnet.v1, on the same inputs
        expected = {
            "fp32": ours.classify(list(tensors), top_k=5),
            "bytes": ours.classify(list(images.values()), top_k=5),
        }
    for kind, response in expected.items():
        rows = [[label.split(":", 2) for label in row] for row in seen[f"{kind}_top"]]
        assert [[label for _, _, label in row] for row in rows] == [[p.label for p in r.top] for r in response.results]
        assert [[int(index) for _, index, _ in row] for row in rows] == [
            [p.class_index for p in r.top] for r in response.results
        ]
        scores = np.array([[float(score) for score, _, _ in row] for row in rows])
        np.testing.assert_allclose(scores, [[p.probability for p in r.top] for r in response.results], atol=1e-5)
        probabilities = np.array(seen[f"{kind}_probabilities"])
        assert probabilities.shape == (2, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.sort(probabilities, axis=1)[:, ::-1][:, :5], scores, atol=1e-5)


ONE = [1, 3, SIZE, SIZE]


def infer(datatype="FP32", shape=ONE, raw=None, contents=None, name="INPUT__0", **fields) -> v2.ModelInferRequest:
    """A ModelInfer request with one input: raw (bytes) or typed (contents) or neither."""
    tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, contents=contents)
    request = v2.ModelInferRequest(**{"model_name": "alexnet", **fields}, inputs=[tensor])
    request.raw_input_contents.extend([raw] if raw is not None else [])
    return request


def fp32(shape=ONE, raw=None, **fields):
    return infer("FP32", shape, np.zeros(shape, "<f4").tobytes() if raw is None else raw, **fields)


def encoded(*images, shape=None, **fields):
    return infer("BYTES", shape or [len(images)], contents=v2.InferTensorContents(bytes_contents=images), **fields)


def top_k(k, kind="int64_param"):
    output = v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
    setattr(output.parameters["classification"], kind, k)
    return [output]


BAD = {
    "datatype": (
        lambda: infer("INT32", [1], b"\0" * 4),
        "INVALID_ARGUMENT",
        r"datatype 'INT32'; send FP32 \[N, 3, 227, 227\]",
    ),
    "shape": (
        lambda: fp32([1, 3, 64, 64]),
        "INVALID_ARGUMENT",
        r"shape \[1, 3, 64, 64\]; it must be \[N, 3, 227, 227\]",
    ),
    "no batch": (lambda: fp32([3, SIZE, SIZE]), "INVALID_ARGUMENT", r"it must be \[N, 3, 227, 227\]"),
    "byte count": (lambda: fp32(raw=b"\0" * 12), "INVALID_ARGUMENT", "holds 12 bytes; FP32 .* needs 618348"),
    "typed count": (
        lambda: infer(contents=v2.InferTensorContents(fp32_contents=[0.0] * 5)),
        "INVALID_ARGUMENT",
        "fp32_contents holds 5 values",
    ),
    "no data": (lambda: infer(), "INVALID_ARGUMENT", "fp32_contents holds 0 values"),
    "input name": (
        lambda: fp32(name="image"),
        "INVALID_ARGUMENT",
        "unknown input 'image': the model's input is INPUT__0",
    ),
    "long name": (lambda: fp32(name="x" * 100_000), "INVALID_ARGUMENT", r"unknown input 'x+\.\.\.'"),
    "no input": (
        lambda: v2.ModelInferRequest(model_name="alexnet"),
        "INVALID_ARGUMENT",
        "0 inputs: send one, INPUT__0",
    ),
    "over the batch": (
        lambda: encoded(*[b"x"] * (MAX_BATCH + 1)),
        "INVALID_ARGUMENT",
        "5 images in one request; .* at most 4",
    ),
    "undecodable": (lambda: encoded(b"not an image"), "INVALID_ARGUMENT", "image 0 cannot be decoded"),
    "bytes shape": (
        lambda: encoded(b"x", shape=[1, 1]),
        "INVALID_ARGUMENT",
        r"BYTES of shape \[1, 1\]; it must be \[N\]",
    ),
    "bytes count": (lambda: encoded(b"x", b"y", shape=[3]), "INVALID_ARGUMENT", "bytes_contents holds 2 elements"),
    "bytes length": (
        lambda: infer("BYTES", [1], struct.pack("<I", 1000) + b"abc"),
        "INVALID_ARGUMENT",
        "says 1000 bytes, but only 3 follow",
    ),
    "not finite": (lambda: fp32(raw=np.full(ONE, np.nan, "<f4").tobytes()), "INVALID_ARGUMENT", "NaN"),
    "raw and typed": (
        lambda: infer("BYTES", [1], b"x", v2.InferTensorContents(bytes_contents=[b"x"])),
        "INVALID_ARGUMENT",
        "both raw_input_contents and contents",
    ),
    "top 0": (lambda: fp32(outputs=top_k(0)), "INVALID_ARGUMENT", r"classification must be between 1 and 10 .* got 0"),
    "top 11": (lambda: fp32(outputs=top_k(11)), "INVALID_ARGUMENT", "between 1 and 10"),
    "top as text": (lambda: fp32(outputs=top_k("5", "string_param")), "INVALID_ARGUMENT", "must be an int64"),
    "output name": (
        lambda: fp32(outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
        "INVALID_ARGUMENT",
        "unknown output 'logits': the model's output is probabilities",
    ),
    "model": (lambda: fp32(model_name="resnet"), "NOT_FOUND", "no model 'resnet' here: .* one model, 'alexnet'"),
    "version": (lambda: fp32(model_version="7"), "NOT_FOUND", "version '7' is not served: .* serves version 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_infer_requests_say_what_to_fix(stub, case):
    build, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(build(), timeout=60)
    assert caught.value.code().name == code
    assert re.search(message, caught.value.details()) and len(caught.value.details()) <= 1000


def test_our_stubs_typed_contents_version_metrics_and_reflection(server, stub):
    """fp32_contents, an explicit version, uint64 classification; reflection, bytes that are no
    message; then each protocol's counters."""
    tensor = np.random.default_rng(2).normal(size=ONE).astype(np.float32)
    typed = infer(
        contents=v2.InferTensorContents(fp32_contents=tensor.ravel()),
        model_version="0",
        id="req-1",
        outputs=top_k(3, "uint64_param") + [v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
    )
    response = stub.ModelInfer(typed, timeout=60)
    raw = stub.ModelInfer(fp32(raw=tensor.tobytes()), timeout=60)
    assert (response.model_name, response.model_version, response.id) == ("alexnet", "0", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "BYTES", [1, 3]),
        ("probabilities", "FP32", [1, 10]),
    ]
    assert response.raw_output_contents[1] == raw.raw_output_contents[0]  # typed and raw contents: the same answer
    labels, at, blob = [], 0, response.raw_output_contents[0]
    while at < len(blob):
        (length,) = struct.unpack_from("<I", blob, at)
        labels.append(blob[at + 4 : at + 4 + length].decode())
        at += 4 + length
    probabilities = np.frombuffer(raw.raw_output_contents[0], "<f4")
    assert [int(label.split(":")[1]) for label in labels] == list(np.argsort(-probabilities)[:3])
    assert stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="alexnet", version="3"), timeout=10).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="alexnet", version="0"), timeout=10).ready

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes that are no message
        with pytest.raises(grpc.RpcError) as caught:
            garbage(b"\xff\xff\xff", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(fp32(name="image"), timeout=30)
    with AlexNetClient(f"127.0.0.1:{server.port}", timeout=60) as ours:
        ours.classify([tensor[0]], top_k=1)
    counts = {
        tuple(sorted(dict(labels).items())): value
        for (name, labels), value in scrape(server).items()
        if name == "alexnet_classify_requests_total"
    }
    assert counts[(("code", "OK"), ("protocol", "kserve.v2"))] >= 2
    assert counts[(("code", "INVALID_ARGUMENT"), ("protocol", "kserve.v2"))] >= 1
    assert counts[(("code", "OK"), ("protocol", "alexnet.v1"))] >= 1
