# Sourced by the benchmarks/gpu_*.sh scripts, from the repository root: the Python to use ($PY), compiled Triton
# (no interpreter), unbuffered output, the package on PYTHONPATH, and packages missing on the GPU machine (diffusers
# for the model) installed offline from wheels carried in .whl/ or .wheels/ into a private folder.
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
for d in .whl .wheels; do
    if compgen -G "$d/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mfsr_site \
            "$d"/*.whl && export PYTHONPATH="/tmp/mfsr_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
