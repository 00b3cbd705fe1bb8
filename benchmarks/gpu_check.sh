#!/usr/bin/env bash
# One GPU check, under 6 minutes, on a machine with an NVIDIA GPU and no network:
#   1. the kernel parity tests (adaLN, attention), compiled for the GPU (same tests as the CPU interpreter runs);
#   2. the kernel benchmarks at full size;
#   3. a short table (GPU, dtype, shape, time, GB/s, ratio to each baseline) as the last lines.
# Needs torch, triton, pytest and pytest-benchmark; without network, carry wheels in .wheels/ (pip download
# pytest-benchmark py-cpuinfo -d .wheels) and this script installs them. Results land in ${OUT:-/tmp}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
PY="${PYTHON:-python}"
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null && [ -d .wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .wheels pytest-benchmark
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'

timeout 180 "$PY" -m pytest -q -x tests/test_adaln_kernel.py tests/test_attention_kernel.py -p no:cacheprovider 2>&1 \
    | tail -5
parity=${PIPESTATUS[0]}
timeout 150 "$PY" -m pytest -q benchmarks/test_adaln.py benchmarks/test_attention.py --benchmark \
    --benchmark-json="$OUT_DIR/bench_kernels.json" -p no:cacheprovider 2>&1 | tail -3
"$PY" benchmarks/summarize.py "$OUT_DIR/bench_kernels.json"
echo "parity tests exit code: $parity"
