#!/usr/bin/env bash
# The embedded default's restorer-conditioned chain (`make train-default`) on one GPU, in one call of about 8
# minutes, trained several times longer than the CPU recipe, with three students side by side. Stages, each with a
# time limit:
#   0. benchmarks/gpu_pipeline.py: each part of a teacher step timed on its own (CPU batch, restorer, optimizer step),
#      so that the log says what bounds the steps per second;
#   1. the `tiny-r` teacher for TEACHER_MIN minutes of training on CUDA: fresh degraded 128 px crops of DATA every
#      step, degraded in NW (12) data-loading processes and restored (Real-ESRGAN x4plus) on the GPU; at the same
#      time a pool of POOL crops (training.pool, R on the GPU) for the next stage;
#   2. the teacher's 40-step samples on the pool (training.trajectories --device cuda; the evaluation's
#      teacher:40:cfg1.25:refine0.5:above0.5);
#   3. three students side by side for STUDENT_MIN minutes each, all regressing onto the teacher's samples blended
#      with that teacher's own one Euler step (--trajectory-anchor teacher --trajectory-mix MIX, default 0.8: the
#      embedded default's last stage), that regression weighted TRAJ_WEIGHT (default 10):
#      "line": --trajectory-refine 0.25 --trajectory-line 0.25;
#      "endpoint": --trajectory-line 0.5 with endpoint jumps on a grid from 0.25 (--jump endpoint --refine-t 0.25);
#      "p05": "line" with MeanFlow's adaptive loss weighted by 1 / (L + c)^LOSS_P (default 0.5; 1 is the others').
#      The folder is named p05 whatever LOSS_P is; LOSS_P=1 leaves it out;
#      "grown" (GROW=4, off by default): "line" with GROW more blocks than the teacher (--grow-layers). Its 22 MB tar
#      and p05's together pass the 64 MiB a call brings back: with GROW=4, set LOSS_P=1;
#   4. export of the teacher and the students side by side (90 s each; without the restorer's weights, which the
#      set-up installs); "line", "p05" and "grown" with the embedded default's sampler (--refine-t 0.8 --refine-side
#      above --jump endpoint, as `make train-default` exports it), so that model-line can replace
#      mfsr_fast/weights/default as it is; "endpoint" keeps the grid it trained with.
# Evaluation runs afterwards on the CPU machine, where all 93 DRealSR pairs and Real-ESRGAN's row are (the HR images
# do not fit beside the restorer in a call's 64 MiB): untar the model folders into runs/ and run all of them in one
# table (one R(LR) per image for every row), for example
#   python -m mfsr_fast.evaluation --data ../shared/data/eval/drealsr_x4 --border 0 --model runs/model-line \
#     --student endpoint=runs/model-endpoint --student p05=runs/model-p05 \
#     --methods realesrgan,student:1,student:4,endpoint:1,endpoint:2,p05:1,p05:4 \
#     --niqe-params ../shared/data/metrics/niqe_pris_params.npz --per-image runs/gpu.csv
# (and --teacher runs/model-teacher with teacher:40:cfg1.25:refine0.5:above0.5 on a few pairs).
# Prepare the call with benchmarks/gpu_restorer_prep.sh (wheels, a share of the training images in .gpudata/, the
# device tool's carry list). DATA defaults to .gpudata/train (about 110 of the 571 training images, all four sources;
# fresh crops and degradations every step), else ../shared/data/train. Smoke test on the CPU with small settings:
# PYTHON=.venv/bin/python DEVICE=cpu TEACHER_MIN=0.3 STUDENT_MIN=0.3 POOL=16 BATCH=4 TRAJ_BATCH=2. What its runs
# gave: docs/results/training-cost.md. The stages' limits add up to 575 s at the defaults, inside a call's 600 s.
# Out (${OUT:-/tmp/mfsr_gpu_restorer}): logs.tar.gz (logs and JSON) and model-teacher.tar, model-line.tar,
# model-endpoint.tar, model-p05.tar (each under the 16 MB a returned file may have, about 50 MB in all, under the
# 64 MiB a call brings back); with GROW=4 model-grown.tar in parts of 15 MB (model-grown.tar.part-aa, -ab:
# `cat model-grown.tar.part-* | tar x` joins them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/mfsr_gpu_restorer}"
W="${WORK:-/tmp/mfsr_restorer}"
if [ -d .gpudata/train ]; then DATA="${DATA:-.gpudata/train}"; else DATA="${DATA:-../shared/data/train}"; fi
TEACHER_MIN="${TEACHER_MIN:-3}"
STUDENT_MIN="${STUDENT_MIN:-1.5}"
BATCH="${BATCH:-64}"  # the teacher's and the students' MeanFlow batch (the CPU recipe: 16)
TRAJ_BATCH="${TRAJ_BATCH:-16}"  # stored pairs per student step (the CPU runs: 8)
POOL="${POOL:-2048}"  # crops with the teacher's 40-step samples
POOL_LIMIT="${POOL_LIMIT:-$(awk -v m="$TEACHER_MIN" 'BEGIN { printf "%d", m * 60 + 60 }')}"  # the pool, beside the teacher
MIX="${MIX:-0.8}"
TRAJ_WEIGHT="${TRAJ_WEIGHT:-10}"  # --trajectory-weight (the regression onto the stored samples; 1 before)
GROW="${GROW:-0}"
LOSS_P="${LOSS_P:-0.5}"
# p05 runs unless LOSS_P is 1 as a number (1, 1.0, 1e0 all leave it out)
P05=$(awk -v p="$LOSS_P" 'BEGIN { if (p !~ /^[0-9.eE+-]+$/) print "bad"; else print (p + 0 != 1) }')
[ "$P05" = bad ] && { echo "LOSS_P must be a number, got '$LOSS_P'" >&2; exit 2; }
DEVICE="${DEVICE:-cuda}"
NW="${NW:-12}"  # data-loading processes degrading the crops on the CPU (the GPU machine has 16 cores)
source benchmarks/gpu_env.sh
rm -rf "$W" && mkdir -p "$W" "$OUT_DIR"
start=$SECONDS
stamp() { echo "== $1 ($((SECONDS - start)) s)"; }
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'); data $DATA ($(find "$DATA" -type f | wc -l) files)"
secs() { awk -v m="$1" 'BEGIN { printf "%d", m * 60 + 40 }'; }  # a stage's limit: its training minutes + start-up

pack() {  # whatever exists, even after a stage timed out
    (cd "$W" && find . -maxdepth 2 \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' \) -print0 \
        | tar czf "$OUT_DIR/logs.tar.gz" --null -T -)
    for m in teacher line endpoint grown p05; do
        [ -d "$W/model-$m" ] || continue
        tar cf "$OUT_DIR/model-$m.tar" -C "$W" "model-$m"
        if [ "$(stat -c %s "$OUT_DIR/model-$m.tar")" -gt $(( 15 * 1048576 )) ]; then  # a returned file: <= 16 MB
            split -b 15M "$OUT_DIR/model-$m.tar" "$OUT_DIR/model-$m.tar.part-" && rm "$OUT_DIR/model-$m.tar"
        fi
    done
}
trap pack EXIT

stamp "where a teacher step's time goes (benchmarks/gpu_pipeline.py)"
timeout 75 "$PY" benchmarks/gpu_pipeline.py --data "$DATA" --batch "$BATCH" --workers "$NW" --device "$DEVICE" \
    >"$W/pipeline.log" 2>&1
echo "pipeline exit $?"; grep -E "^\\||ceiling|Error" "$W/pipeline.log"

stamp "teacher, $TEACHER_MIN min, batch $BATCH; pool of $POOL crops beside it"
timeout "$POOL_LIMIT" "$PY" -m training.pool --data "$DATA" --out "$W/pool" \
    --count "$POOL" --crop 128 --degradation mild --device "$DEVICE" --shard 256 >"$W/pool.log" 2>&1 &
pool_pid=$!
timeout "$(secs "$TEACHER_MIN")" "$PY" -m training.teacher --preset tiny-r --data "$DATA" --output-dir "$W/teacher" \
    --device "$DEVICE" --degrade-on workers --num-workers "$NW" --batch-size "$BATCH" --max-minutes "$TEACHER_MIN" \
    --max-steps 1000000 --ckpt-every 1000 --log-every 100 >"$W/teacher.log" 2>&1
echo "teacher exit $?"; grep -E "reached|done:|Error|error" "$W/teacher.log" | tail -3; tail -1 "$W/teacher/log.jsonl"
wait "$pool_pid"; echo "pool exit $?"; tail -1 "$W/pool.log"

stamp "the teacher's 40-step samples on the pool"
timeout 60 "$PY" -m training.trajectories --pool "$W/pool" --teacher "$W/teacher" --out "$W/traj40" \
    --count "$POOL" --steps 40 --sampling cfg1.25:refine0.5:above0.5 --batch 256 --shard 512 --device "$DEVICE" \
    >"$W/traj40.log" 2>&1
echo "trajectories exit $?"; tail -1 "$W/traj40.log"

stamp "students, $STUDENT_MIN min each, side by side (grown: $GROW more blocks; p05: --loss-p $LOSS_P)"
common=(--preset tiny-r --data "$DATA" --teacher "$W/teacher" --trajectories "$W/traj40" --trajectory-anchor teacher
        --trajectory-mix "$MIX" --trajectory-batch "$TRAJ_BATCH" --trajectory-weight "$TRAJ_WEIGHT"
        --guidance 1.25 --guidance-above 0.5
        --device "$DEVICE" --degrade-on workers --num-workers $(( NW / 3 > 0 ? NW / 3 : 1 )) --batch-size "$BATCH"
        --max-minutes "$STUDENT_MIN" --max-steps 1000000 --ckpt-every 1000 --log-every 50)
timeout "$(secs "$STUDENT_MIN")" "$PY" -m training.distill "${common[@]}" --output-dir "$W/line" \
    --trajectory-refine 0.25 --trajectory-line 0.25 >"$W/line.log" 2>&1 &
p1=$!
timeout "$(secs "$STUDENT_MIN")" "$PY" -m training.distill "${common[@]}" --output-dir "$W/endpoint" \
    --trajectory-line 0.5 --jump endpoint --refine-t 0.25 >"$W/endpoint.log" 2>&1 &
p2=$!
students=(line endpoint)
if [ "$GROW" -gt 0 ]; then
    timeout "$(secs "$STUDENT_MIN")" "$PY" -m training.distill "${common[@]}" --output-dir "$W/grown" \
        --trajectory-refine 0.25 --trajectory-line 0.25 --grow-layers "$GROW" >"$W/grown.log" 2>&1 &
    p3=$!
    students+=(grown)
fi
if [ "$P05" = 1 ]; then
    timeout "$(secs "$STUDENT_MIN")" "$PY" -m training.distill "${common[@]}" --output-dir "$W/p05" \
        --trajectory-refine 0.25 --trajectory-line 0.25 --loss-p "$LOSS_P" >"$W/p05.log" 2>&1 &
    p4=$!
    students+=(p05)
fi
wait "$p1"; echo "line exit $?"; wait "$p2"; echo "endpoint exit $?"
[ "$GROW" -gt 0 ] && { wait "$p3"; echo "grown exit $?"; }
[ "$P05" = 1 ] && { wait "$p4"; echo "p05 exit $?"; }
for m in "${students[@]}"; do grep -E "reached|done:|Error" "$W/$m.log" | tail -2; tail -1 "$W/$m/log.jsonl"; done

stamp "export, side by side"
exports=()
for m in teacher "${students[@]}"; do
    grid=()  # the default's sampler for the default's recipe and its variants (Makefile train-default)
    case "$m" in line | p05 | grown) grid=(--refine-t 0.8 --refine-side above --jump endpoint) ;; esac
    timeout 90 "$PY" -m training.export "$W/$m" "$W/model-$m" --no-restorer "${grid[@]}" >"$W/export-$m.log" 2>&1 &
    exports+=("$m:$!")
done
for e in "${exports[@]}"; do wait "${e#*:}"; echo "export ${e%%:*} exit $?"; tail -1 "$W/export-${e%%:*}.log"; done
stamp "done"
