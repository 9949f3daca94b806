#!/usr/bin/env bash
# GPU check for a CUDA machine: the equivalence, exchange and failure tests with the
# towers on the GPU (Ray sees the GPU, so the engine places both towers on it; the reference stays on
# the CPU), then the training benchmark with the reference on the GPU too: each run prints the engine's
# step, plain PyTorch's, each tower's solo step (its compute alone, exchanges replaced by local copies),
# their sum, and the floor (the engine's step less the slowest solo tower). Figures go to
# docs/performance.md. The benchmarks run even when a test fails (device time is scarce); the exit
# status is the first failure's.
#
# One GPU holds both towers ("shared-gpu"): NCCL takes one rank per device, so their exchanges go
# through host shared memory (transport auto). Two processes' kernels take turns on one GPU, so the
# best the engine can do there is the sum of the towers' solo steps. NCCL needs two GPUs or more.
#
#   benchmarks/gpu_check.sh            # uses python3; needs torch (CUDA), ray, numpy, pytest
#
# Where Ray is missing and its wheel is too big to carry (79 MB), carry it stripped: unpack the
# cp312 wheel, drop ray/jars, ray/rllib and ray/llm, tar.xz the rest (30 MB), untar it on the
# machine into a folder on PYTHONPATH, with jsonschema, referencing, jsonschema-specifications
# and rpds-py beside it (how the 2026-11-29 figures were taken).
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')" || exit 1
status=0
step() {
    echo "== $*"
    local start=$SECONDS
    "$@"
    local rc=$?
    echo "== exit $rc after $((SECONDS - start)) s"
    [ "$status" -ne 0 ] || status=$rc
}
# A hung test dumps every thread's stack after 120 s instead of dying silently at the timeout.
step timeout 360 "$PYTHON" -m pytest -q --tb=short -o faulthandler_timeout=120 -p no:cacheprovider \
    tests/test_engine.py tests/test_kernels.py tests/test_tower_failures.py \
    -k "match or float64 or float32 or dropout or volume or gradcheck or killed or crops or one_call"
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
step timeout 150 "$PYTHON" benchmarks/train_step.py --runs 3 --steps 6 --warmup 2 --batch 128
[ "$gpus" -ge 2 ] && step timeout 150 "$PYTHON" benchmarks/train_step.py --runs 3 --steps 6 --warmup 2 --batch 128 --transport nccl
step timeout 120 "$PYTHON" benchmarks/train_step.py --runs 2 --steps 6 --warmup 2 --batch 128 --tf32
exit "$status"
