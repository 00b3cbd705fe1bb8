#!/usr/bin/env bash
# Prepares a device call of benchmarks/gpu_restorer.sh on this (CPU) machine, at no device time:
#   - .whl/: the wheels the GPU machine lacks (diffusers and importlib_metadata, pinned to this venv's versions;
#     its image has the rest, /work/.library/device/KINDS.md);
#   - .gpudata/train/: a share of ../shared/data/train of at most DATA_MB megabytes (default 9), taken round-robin
#     over its folders so that every source is in it (a call carries at most 64 MiB: the repository, the restorer's
#     weights and the wheels leave about that much);
#   - both folders ignored through .git/info/exclude, so they never reach a commit;
#   - the sizes and the call to make: carry [".whl", ".gpudata", "mfsr_fast/weights/realesrgan-x4plus"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SRC="${SRC:-../shared/data/train}"
DATA_MB="${DATA_MB:-9}"
[ -f mfsr_fast/weights/realesrgan-x4plus/model.safetensors ] || { echo "no restorer weights: run make setup"; exit 1; }
[ -d "$SRC" ] || { echo "$SRC: no training images here"; exit 1; }
for d in /.whl/ /.gpudata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .gpudata && mkdir -p .whl .gpudata/train
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$(ver diffusers)" "importlib_metadata==$(ver importlib_metadata)"
"$PY" - "$SRC" "$DATA_MB" <<'PYEOF'
import os, shutil, sys
src, cap = sys.argv[1], float(sys.argv[2]) * 2**20
folders = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
queues = {d: sorted(os.listdir(os.path.join(src, d))) for d in folders}
used, taken = 0, {d: 0 for d in folders}
while any(queues.values()):
    for d in folders:
        if not queues[d]:
            continue
        name = queues[d].pop(0)
        size = os.path.getsize(os.path.join(src, d, name))
        if used + size > cap:
            queues[d] = []  # the rest of this folder would not fit either, mostly
            continue
        os.makedirs(os.path.join(".gpudata/train", d), exist_ok=True)
        shutil.copy(os.path.join(src, d, name), os.path.join(".gpudata/train", d, name))
        used += size
        taken[d] += 1
print("training images carried:", ", ".join(f"{d} {n}" for d, n in taken.items()), f"({used / 2**20:.1f} MiB)")
PYEOF
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
carried=$(du -cb .whl .gpudata mfsr_fast/weights/realesrgan-x4plus | tail -1 | cut -f1)
total=$(( tree_mb + ${untracked:-0} + carried ))
echo "repository $(( tree_mb / 1048576 )) MiB + untracked $(( ${untracked:-0} / 1048576 )) MiB + carried $(( carried / 1048576 )) MiB = $(( total / 1048576 )) MiB (limit 64)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "over the limit: lower DATA_MB"; exit 1; }
echo 'device run: carry [".whl", ".gpudata", "mfsr_fast/weights/realesrgan-x4plus"], timeout_s 600, command:'
echo '  OUT=$OUT bash benchmarks/gpu_restorer.sh'
