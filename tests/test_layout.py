"""The layout's rules, checked: one way for imports between coordinator's packages, functions of a
readable length, one owner for what goes into the object store, and Ray Data workers that stay light."""

import ast
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COORDINATOR = ROOT / "coordinator"
# What each package may import: data <- training <- service, and engine <- training.
ALLOWED = {
    "data": set(),
    "engine": set(),
    "training": {"data", "engine"},
    "service": {"data", "engine", "training"},
}


def modules():
    return sorted(COORDINATOR.rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The coordinator packages a module imports (coordinator.<package>...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "coordinator" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_lives_in_one_of_the_four_packages():
    loose = [p.name for p in COORDINATOR.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert {p.name for p in COORDINATOR.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


def test_imports_between_packages_go_one_way():
    wrong = []
    for path in modules():
        package = path.relative_to(COORDINATOR).parts[0]
        if package not in ALLOWED:
            continue  # coordinator/__init__.py re-exports the engine
        for target in imported_packages(path) - ALLOWED[package] - {package}:
            wrong.append(f"{path.relative_to(ROOT)} imports coordinator.{target}")
    assert wrong == []


# The project's own code; proto/ holds generated code, which no one reads.
OWN_CODE = ("benchmarks", "client", "coordinator", "deploy", "tests", "towers")
LONGEST_FUNCTION = 60


def test_no_function_is_longer_than_a_reader_holds():
    """A function a reader takes in whole: split a longer one into named steps."""
    long = []
    for folder in OWN_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if (length := node.end_lineno - node.lineno + 1) > LONGEST_FUNCTION:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], "split these into named steps:\n" + "\n".join(long)


def test_only_the_engines_batches_go_into_the_object_store():
    """Tensors go tower to tower through the exchanges; the object store takes only the batch, once, from one place."""
    callers = [str(p.relative_to(ROOT)) for p in modules() if "ray.put(" in p.read_text()]
    assert callers == ["coordinator/engine/batches.py"]


_WORKER = """
import pickle, sys
augment = pickle.loads(sys.stdin.buffer.read())
out = augment({"path": [sys.argv[1]], "label": [3], "position": [0]})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "coordinator"))  # a worker has Ray anyway
print(out["crops"].shape, bool(out["ok"][0]), heavy)
"""


def test_ray_data_workers_get_the_image_code_without_importing_the_package(tmp_path):
    """The augmentation reaches a worker by value: decoding an image there imports neither this
    package nor torch, which would cost every worker seconds and hundreds of MB."""
    import ray.cloudpickle

    from coordinator.data.images import Augment, ColourStats
    from coordinator.data.loader import batches  # noqa: F401 (registers the by-value pickling)

    image = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(image)
    blob = ray.cloudpickle.dumps(
        Augment(ColourStats.imagenet(), "train", seed=0, epoch=0), protocol=pickle.HIGHEST_PROTOCOL
    )
    run = subprocess.run([sys.executable, "-c", _WORKER, str(image)], input=blob, capture_output=True, check=True)
    assert run.stdout.decode().split() == ["(1,", "227,", "227,", "3)", "True", "[]"]


def test_benchmarks_import_the_project_as_installed():
    """Benchmarks run in the venv that `make install` made: none edits sys.path to find the project."""
    editing = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if "sys.path" in p.read_text()]
    assert editing == []


PERFORMANCE = ROOT / "docs" / "performance.md"
# A pointer into docs/performance.md names its section: docs/performance.md, "Training step".
SECTION_POINTER = re.compile(r'docs/performance\.md\)?,\s*(?:#\s*)?"([^"]+)"')


def test_the_performance_doc_opens_with_the_current_figures_table():
    """One row per figure, each with its command, machine and date; the machines are named below it."""
    lines = PERFORMANCE.read_text().splitlines()
    sections = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert lines[sections[0]] == "## Current figures"
    section = lines[sections[0] : sections[1]]
    table = [line for line in section if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["figure", "value", "command", "machine", "date"]
    machines = set(re.findall(r"^- \*\*([^*]+)\*\*:", "\n".join(section), re.MULTILINE))
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[2:]]
    assert len(rows) >= 20
    for row in rows:
        assert len(row) == 5 and all(row), row
        assert row[3].split(",")[0] in machines, row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row[4]), row


def test_pointers_into_the_performance_doc_name_its_sections():
    headings = {line.lstrip("#").strip() for line in PERFORMANCE.read_text().splitlines() if line.startswith("#")}
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ("coordinator", "towers", "client", "benchmarks", "deploy"):
        sources += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".md", ".yml", ".yaml")]
    wrong = []
    for path in sources:
        for name in SECTION_POINTER.findall(path.read_text()):
            if (section := re.sub(r"\s+#?\s*", " ", name)) not in headings:
                wrong.append(f"{path.relative_to(ROOT)}: {section}")
    assert wrong == []


def test_the_protocol_adapters_are_siblings():
    """alexnet.v1 (servicers.py, convert.py) and the Open Inference Protocol (kserve.py) share
    protocol.py only: neither imports the other."""
    service = COORDINATOR / "service"

    def imports(name: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse((service / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:  # `from a.b import c` may import module a.b.c
                found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        return found

    v1, kserve = "coordinator.service.servicers", "coordinator.service.kserve"
    assert not imports("kserve.py") & {v1, "coordinator.service.convert"}
    assert kserve not in imports("servicers.py") | imports("convert.py")
    assert "coordinator.service.protocol" in imports("kserve.py") & imports("servicers.py")


_HELP = """
import contextlib, io, sys
from client.cli import main
for argv in (["--help"], ["train", "--help"], ["demo", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
        main(argv)
    assert "usage: alexnet-mp" in shown.getvalue(), argv
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "torchvision"}))
"""


def test_client_commands_load_neither_torch_nor_ray():
    """`alexnet-mp --help` and the client's commands start at once: the presets they offer come from
    the recipe module, which imports neither."""
    run = subprocess.run([sys.executable, "-c", _HELP], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["[]"], run.stderr


def test_the_clis_presets_are_the_recipe_modules(capsys):
    from client.cli import build_parser
    from coordinator.training.recipe import PRESETS

    parser = build_parser()
    for command in ("train", "demo"):
        assert [parser.parse_args([command, "--preset", name]).preset for name in PRESETS] == list(PRESETS)
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--preset", "fast"])
        assert "invalid choice: 'fast'" in capsys.readouterr().err
