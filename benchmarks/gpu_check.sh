#!/usr/bin/env bash
# GPU check for a CUDA machine, about 3-5 minutes: the equivalence tests with the towers on the
# GPU (Ray sees the GPU, so the engine places both towers on it; the reference stays on the CPU),
# then the training benchmark with the reference on the GPU too. Figures go to docs/performance.md.
#
#   benchmarks/gpu_check.sh            # uses python3; needs torch (CUDA), ray, numpy, pytest
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q tests/test_engine.py tests/test_kernels.py \
    -k "match or float64 or float32 or dropout or volume or gradcheck" -p no:cacheprovider
"$PYTHON" benchmarks/train_step.py --steps 10 --warmup 2 --batch 128
