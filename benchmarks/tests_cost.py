"""What some test modules add to a CI run: the sum of their tests' set-up, call and tear-down times.

    python benchmarks/tests_cost.py tests/test_export.py tests/test_finetune.py tests/test_variants.py
    python benchmarks/tests_cost.py --runs 3 tests/test_export.py

Each run is one pytest session (in file order, pytest-randomly off) that starts with a warm-up
test making what the whole suite shares, so that none of it falls on the modules measured: the
session's Ray, the learning dataset (conftest.py's learning_patterns) and Ray Data's first pass.
The figure is the sum of the modules' `--durations=0` lines. Prints each run's sum and the median.
Not a test: a run (about a minute a run for issue 29's three modules on 2 cores).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

WARM_UP = """
def test_warm_up(ray_session, learning_patterns):
    from coordinator.data import open_dataset

    open_dataset(learning_patterns / "train", learning_patterns / "val")
"""
DURATION = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="test files, as pytest takes them")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    tests = Path(__file__).resolve().parent.parent / "tests"
    warm_up = tests / "warm_up_for_tests_cost.py"  # beside conftest.py, whose fixtures it takes
    sums = []
    try:
        warm_up.write_text(WARM_UP)
        for run in range(args.runs):
            sums.append(one_run(warm_up, args.modules))
            print(f"run {run + 1}: {sums[-1]:.1f} s", flush=True)
    finally:
        warm_up.unlink(missing_ok=True)
    print(f"{', '.join(args.modules)}: {statistics.median(sums):.1f} s (median of {len(sums)})")


def one_run(warm_up: Path, modules: list[str]) -> float:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "--durations=0", "-vv", str(warm_up)]
    done = subprocess.run(command + modules, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the tests failed:\n{done.stdout[-3000:]}")
    lines = [DURATION.match(line) for line in done.stdout.splitlines()]
    return sum(float(m.group(1)) for m in lines if m and warm_up.name not in m.group(2))


if __name__ == "__main__":
    main()
