#!/usr/bin/env bash
# The GPU machine's software on this CPU machine, at no device time: a virtual environment with the versions its image
# holds (/work/.library/device/KINDS.md: Python 3.12, torch 2.11.0, triton 3.6.0, numpy 2.5.2, safetensors 0.8.0,
# huggingface_hub 1.33.0, transformers 5.17.0; the rest as PyPI has them), and what to run in it:
#   smoke    benchmarks/gpu_restorer.sh end to end on the CPU with small settings, diffusers installed from .whl/ as on
#            the device (prepared by benchmarks/gpu_restorer_prep.sh): torch / Python / diffusers incompatibilities
#            show up here instead of inside a 15-minute device budget (182-212 s here with the grown student; 129-131 s
#            with the p05 student in its place, the default now);
#   kernels  the Triton kernels' parity tests and ahead-of-time compilation under triton 3.6 (the interpreter there
#            needs numpy < 2.3: it calls int() on one-element arrays, which newer numpy refuses, so this mode installs
#            numpy 2.2.6 first; the device never runs the interpreter) (6.1 min here);
#   all      both (the default).
# Run it on an otherwise idle CPU: the smoke keeps the device script's stage limits, which a loaded 2-core machine can
# overrun at these small settings (seen: the 16-crop pool stage cut at its 78 s while a test suite ran beside it).
# ENV (default /tmp/mfsr_device_env) is kept between calls; delete it to rebuild. Downloads torch 2.11.0 and the CUDA
# libraries its PyPI wheel depends on (from PyPI only, about 2.5 min here; 5.1 GB installed; nothing outside ENV).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-all}"
case "$MODE" in smoke|kernels|all) ;; *) echo "usage: $0 [smoke|kernels|all]"; exit 2 ;; esac
ENV="${ENV:-/tmp/mfsr_device_env}"
PY312=""
for c in ${PY312_PATH:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do  # the first that runs
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312="$c"; break; fi
done
[ -n "$PY312" ] || { echo "no Python 3.12 found (the GPU machine's): set PY312_PATH=/path/to/python3.12"; exit 1; }
if [ ! -x "$ENV/bin/python" ]; then
    "$PY312" -m venv "$ENV"
    "$ENV/bin/python" -m pip install -q --upgrade pip
    "$ENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 numpy==2.5.2 safetensors==0.8.0 \
        huggingface_hub==1.33.0 transformers==5.17.0 pillow tqdm scikit-image requests regex filelock pytest \
        pytest-benchmark
fi
numpy() { "$ENV/bin/python" -m pip install -q "numpy==$1"; }
rc=0
if [ "$MODE" != kernels ]; then
    compgen -G ".whl/diffusers-*.whl" >/dev/null || bash benchmarks/gpu_restorer_prep.sh
    numpy 2.5.2
    rm -rf /tmp/mfsr_device_env_out  # (the device empties $OUT before each call: no tar of an earlier run counts)
    echo "== smoke: benchmarks/gpu_restorer.sh on the CPU in $ENV"
    PYTHON="$ENV/bin/python" DEVICE=cpu TEACHER_MIN=0.3 STUDENT_MIN=0.3 POOL=16 BATCH=4 TRAJ_BATCH=2 NW=2 \
        OUT=/tmp/mfsr_device_env_out WORK=/tmp/mfsr_device_env_work bash benchmarks/gpu_restorer.sh || rc=1
    for m in teacher line endpoint p05; do  # (a tar over 15 MB comes back in parts: model-$m.tar.part-*)
        compgen -G "/tmp/mfsr_device_env_out/model-$m.tar*" >/dev/null || { echo "smoke: model-$m.tar missing"; rc=1; }
    done
fi
if [ "$MODE" != smoke ]; then
    numpy 2.2.6
    echo "== kernels: parity and ahead-of-time compilation under triton 3.6 (interpreter)"
    (PYTHON="$ENV/bin/python" && source benchmarks/gpu_env.sh && TRITON_INTERPRET=1 "$PY" -m pytest -q \
        -p no:cacheprovider tests/test_adaln_kernel.py tests/test_attention_kernel.py tests/test_gpu_readiness.py \
        tests/test_model_jvp.py) || rc=1
fi
exit "$rc"
