#!/usr/bin/env bash
# One GPU check, under 6 minutes, on a machine with an NVIDIA GPU and no network:
#   1. the kernel parity tests (adaLN, attention; the tiny model's JVP through both paths), compiled for the GPU:
#      the same tests the CPU runs through the Triton interpreter;
#   2. a short sweep of the attention forward, tangent and fused forward+tangent tiles (python -m kernels.tune), whose best tiles the
#      benchmarks then use (MFSR_ATTN_TILES; the file lands in the output folder);
#   3. the benchmarks at full size: adaLN, attention, device copy bandwidth, one MeanFlow training step, upscaling
#      (the default against RRDBNet; the dit4sr preset's 1 step against the teacher's 40 steps x CFG, 512 px), and a
#      profile of the training steps (benchmarks/profile_step.py);
#   4. a short table (GPU, dtype, shape, time, GB/s or TFLOP/s, peak memory, ratio to each baseline) as the last lines.
# BENCH="attention train_step" picks benchmark files (default: all four); TUNE=0 skips the sweep.
# Needs torch, triton, pytest and pytest-benchmark. Packages missing there (diffusers for the model tests and the
# training-step benchmark) travel as wheels in .whl/ or .wheels/ and are installed into a private folder, offline.
# parity.log, bench.log, one JSON per benchmark file and table.md land in ${OUT:-/tmp/mfsr_gpu_check}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/mfsr_gpu_check}"
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh
start=$SECONDS
"$PY" - <<'PYEOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, triton {triton.__version__}, {p.name}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB")
PYEOF
nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null \
    | sed 's/^/driver, sm clock, max sm clock, power limit: /'
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"

# 1. Parity: the two kernel files in parallel (compilation is CPU-bound; 16 cores there).
PT=("$PY" -m pytest -q -p no:cacheprovider --tb=short -rfE)
timeout 170 "${PT[@]}" tests/test_adaln_kernel.py >/tmp/mfsr_parity_adaln.log 2>&1 &
pa=$!
timeout 170 "${PT[@]}" tests/test_attention_kernel.py tests/test_model_jvp.py >/tmp/mfsr_parity_attention.log 2>&1 &
pb=$!
wait $pa; rc_a=$?
wait $pb; rc_b=$?
for f in adaln attention; do
    echo "== parity $f"; grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" "/tmp/mfsr_parity_$f.log" | tail -12
    cat "/tmp/mfsr_parity_$f.log" >>"$OUT_DIR/parity.log"
done
echo "parity exit codes: adaln $rc_a, attention $rc_b ($((SECONDS - start)) s so far)"

# 2. Tile sweep for the attention forward and tangent passes (GPU time, L = 8346).
if [ "${TUNE:-1}" = 1 ]; then
    timeout 130 "$PY" -m kernels.tune --only attention --passes fwd,tangent,fused --budget 90 --write "$OUT_DIR/attn_tiles.json" \
        >"$OUT_DIR/tune.log" 2>&1
    echo "tune exit code $? ($((SECONDS - start)) s so far)"
    grep -A4 "best per pass" "$OUT_DIR/tune.log"
    [ -s "$OUT_DIR/attn_tiles.json" ] && export MFSR_ATTN_TILES="$OUT_DIR/attn_tiles.json"
fi

# 3. Benchmarks, one file at a time (timings must not share the GPU), each with its own JSON so a timeout keeps the rest.
for spec in adaln:150 attention:100 train_step:150 upscale:120; do
    name=${spec%%:*}
    case " ${BENCH:-adaln attention train_step upscale} " in *" $name "*) ;; *) continue ;; esac
    timeout "${spec##*:}" "${PT[@]}" "benchmarks/test_$name.py" --benchmark --benchmark-json="$OUT_DIR/bench_$name.json" \
        >"/tmp/mfsr_bench_$name.log" 2>&1
    echo "bench $name exit code $? ($((SECONDS - start)) s so far)"
    grep -E "passed|failed|FAILED|Error" "/tmp/mfsr_bench_$name.log" | tail -6
    cat "/tmp/mfsr_bench_$name.log" >>"$OUT_DIR/bench.log"
done

timeout 90 "$PY" benchmarks/profile_step.py >"$OUT_DIR/profile.log" 2>&1
echo "profile exit code $? ($((SECONDS - start)) s so far)"
grep -E "^== " "$OUT_DIR/profile.log"

# 4. The table.
"$PY" benchmarks/summarize.py "$OUT_DIR"/bench_*.json | tee "$OUT_DIR/table.md"
