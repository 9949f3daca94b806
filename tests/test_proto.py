"""The API contract: the committed generated code is exactly what proto/ generates."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from alexnet_api.v1 import alexnet_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
# Each proto file (under proto/) and the modules generated beside it.
PROTOS = {
    "alexnet_api/v1/alexnet.proto": ("alexnet_pb2.py", "alexnet_pb2.pyi", "alexnet_pb2_grpc.py"),
    "alexnet_api/inference_v2/open_inference_grpc.proto": (
        "open_inference_grpc_pb2.py",
        "open_inference_grpc_pb2.pyi",
        "open_inference_grpc_pb2_grpc.py",
    ),
}


@pytest.mark.parametrize("proto", PROTOS)
def test_regenerating_from_proto_changes_nothing(tmp_path, proto):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the test extra")
    source = tmp_path / Path(proto).parent
    source.mkdir(parents=True)
    shutil.copy(PROTO / proto, source)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{tmp_path}",
        f"-I{well_known}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        proto,
    ]
    assert protoc.main(args) == 0
    for name in PROTOS[proto]:
        fresh = (source / name).read_text()
        committed = (PROTO / Path(proto).parent / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


# A generated module's service and messages as a client meets them on the wire: the service's full
# name, each method's message types, and each field's name, number, type and repetition.
WIRE_SHAPE = """
import json, sys
def fields(message):
    out = {
        f.name: [f.number, f.type, f.label, f.message_type.full_name if f.message_type else ""] for f in message.fields
    }
    for nested in message.nested_types:
        out.update({f"{nested.name}.{k}": v for k, v in fields(nested).items()})
    return out
module = __import__(sys.argv[1], fromlist=["DESCRIPTOR"])
service = module.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods, messages = (sys.argv[2].split(","), sys.argv[3].split(",")) if len(sys.argv) > 3 else (
    [m.name for m in service.methods], list(module.DESCRIPTOR.message_types_by_name))
print(json.dumps({"service": service.full_name,
                  "methods": {m: [service.methods_by_name[m].input_type.full_name,
                                  service.methods_by_name[m].output_type.full_name] for m in methods},
                  "messages": {n: fields(module.DESCRIPTOR.message_types_by_name[n]) for n in messages}}))
"""


def wire_shape(module: str, *selection: str) -> dict:
    """The service and messages of a generated module, read in a process of its own (two modules
    defining the package `inference` cannot share one)."""
    run = subprocess.run(
        [sys.executable, "-c", WIRE_SHAPE, module, *selection],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    return json.loads(run.stdout)


def test_our_protocol_definition_is_the_triton_clients_on_the_wire():
    """We wrote the protocol's proto from its specification; the unmodified Triton client's generated
    code must agree with it on the service's name, each method's messages, and every field."""
    ours = wire_shape("alexnet_api.inference_v2.open_inference_grpc_pb2")
    theirs = wire_shape("tritonclient.grpc.service_pb2", ",".join(ours["methods"]), ",".join(ours["messages"]))
    assert ours["service"] == theirs["service"] == "inference.GRPCInferenceService"
    assert ours["methods"] == theirs["methods"] and len(ours["methods"]) == 6
    assert set(ours["messages"]) == set(theirs["messages"]) and len(ours["messages"]) == 14
    for name, fields in ours["messages"].items():
        extra = {field: shape for field, shape in fields.items() if field not in theirs["messages"][name]}
        assert {field: shape for field, shape in fields.items() if field not in extra} == theirs["messages"][name], name
        assert set(extra) <= NEWER_THAN_TRITON.get(name, set()), name


# The specification's fields that Triton's client predates: it skips them, as protobuf does unknown fields.
NEWER_THAN_TRITON = {"ModelMetadataResponse": {"properties", "PropertiesEntry.key", "PropertiesEntry.value"}}


def test_our_client_leaves_the_inference_package_to_tritonclient():
    """Both define the proto package `inference` in protobuf's one default pool: the client must not load ours."""
    script = "import sys, client; print(sorted(m for m in sys.modules if 'inference_v2' in m))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"


def test_import_names_do_not_collide():
    """The generated code is the package alexnet_api: `proto` belongs to proto-plus on PyPI."""
    spec = importlib.util.find_spec("alexnet_api.v1.alexnet_pb2")
    assert spec is not None and Path(spec.origin).resolve().is_relative_to(PROTO)
    for proto, generated in PROTOS.items():
        for name in generated:
            code = (PROTO / Path(proto).parent / name).read_text()
            assert "import proto" not in code and "from proto" not in code
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "proto" not in packages and {"alexnet_api.v1", "alexnet_api.inference_v2"} <= set(packages)


def test_every_rpc_documents_its_error_statuses():
    text = (PROTO / "alexnet_api" / "v1" / "alexnet.proto").read_text().splitlines()
    codes = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE", "No errors")
    rpcs = [i for i, line in enumerate(text) if line.strip().startswith("rpc ")]
    assert len(rpcs) == sum(len(service.methods) for service in pb.DESCRIPTOR.services_by_name.values()) == 9
    for i in rpcs:
        comment = []
        for line in reversed(text[:i]):
            if not line.strip().startswith("//"):
                break
            comment.append(line)
        assert any(code in " ".join(comment) for code in codes), text[i]
