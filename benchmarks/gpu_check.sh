#!/usr/bin/env bash
# GPU check for a CUDA machine, about 3-5 minutes: the equivalence tests with the towers on the
# GPU (Ray sees the GPU, so the engine places both towers on it; the reference stays on the CPU),
# then the training benchmark with the reference on the GPU too. Figures go to docs/performance.md.
# The benchmark runs even when a test fails (device time is scarce); the exit status is the
# first failure's.
#
#   benchmarks/gpu_check.sh            # uses python3; needs torch (CUDA), ray, numpy, pytest
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
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
step timeout 180 "$PYTHON" -m pytest -q --tb=short -o faulthandler_timeout=120 -p no:cacheprovider \
    tests/test_engine.py tests/test_kernels.py -k "match or float64 or float32 or dropout or volume or gradcheck"
step timeout 90 "$PYTHON" benchmarks/train_step.py --steps 10 --warmup 2 --batch 128
step timeout 90 "$PYTHON" benchmarks/train_step.py --steps 10 --warmup 2 --batch 128 --tf32
step timeout 90 "$PYTHON" benchmarks/train_step.py --steps 6 --warmup 2 --batch 512 --phases 1
exit "$status"
