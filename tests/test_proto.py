"""The API contract: the committed generated code is exactly what proto/ generates."""

import importlib.util
import shutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GENERATED = ("alexnet_pb2.py", "alexnet_pb2.pyi", "alexnet_pb2_grpc.py")


def test_regenerating_from_proto_changes_nothing(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the test extra")
    source = tmp_path / "alexnet_api" / "v1"
    source.mkdir(parents=True)
    shutil.copy(PROTO / "alexnet_api" / "v1" / "alexnet.proto", source)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{tmp_path}", f"-I{well_known}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", "alexnet_api/v1/alexnet.proto"]  # fmt: skip
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (source / name).read_text()
        committed = (PROTO / "alexnet_api" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_import_names_do_not_collide():
    """The generated code is the package alexnet_api: `proto` belongs to proto-plus on PyPI."""
    spec = importlib.util.find_spec("alexnet_api.v1.alexnet_pb2")
    assert spec is not None and Path(spec.origin).resolve().is_relative_to(PROTO)
    for name in GENERATED:
        code = (PROTO / "alexnet_api" / "v1" / name).read_text()
        assert "import proto" not in code and "from proto" not in code
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "proto" not in packages and "alexnet_api.v1" in packages


def test_every_rpc_documents_its_error_statuses():
    text = (PROTO / "alexnet_api" / "v1" / "alexnet.proto").read_text().splitlines()
    codes = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE", "No errors")
    rpcs = [i for i, line in enumerate(text) if line.strip().startswith("rpc ")]
    assert len(rpcs) == 7
    for i in rpcs:
        comment = []
        for line in reversed(text[:i]):
            if not line.strip().startswith("//"):
                break
            comment.append(line)
        assert any(code in " ".join(comment) for code in codes), text[i]
