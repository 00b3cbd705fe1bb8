#!/usr/bin/env bash
# The `tiny` teacher and its students on one GPU (about 8 minutes; every stage has a time limit): does a tiny teacher
# trained longer than the CPU recipe gain from sampling steps, and does its MeanFlow student then sit near the
# teacher's 40 guided steps?
#   1. teacher: the `tiny` recipe (EMA 0.999) for TEACHER_MIN minutes of training wall time on CUDA, on CROP px HR
#      crops (default 128: the 32 px LR tiles upscale() runs; the CPU recipe's 64 px crops have a quarter of the
#      tokens, and that token count, not the positions, makes its many-step samples drift on tiles), degrading the
#      training crops on the GPU (DEGRADE_ON);
#   2. python -m training.diagnose: its clean-image estimate against t, its Euler samples against steps;
#   3. two students side by side (guidance 1.0 and G2) for STUDENT_MIN minutes each; both exported, the teacher too;
#   4. python -m mfsr_fast.evaluation on the first EVAL_PAIRS DRealSR pairs: bicubic, teacher 1 / 40 / 40 x CFG G2
#      steps, each student 1 / 2 / 4 steps (NIQE on the CPU cores, in parallel).
# DATA (training images), EVAL (an HR/LR folder) and NIQE (parameters) default to ../shared/data; a device run
# carries a copy in .gpudata/ (train/, eval/drealsr_x4/, metrics/). Carried wheels in .whl/ as in gpu_check.sh.
# Out (${OUT:-/tmp/mfsr_gpu_quality}): logs.tar.gz (logs, tables, JSON) and teacher.tar, student-g*.tar (model folders).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/mfsr_gpu_quality}"
W="${WORK:-/tmp/mfsr_quality}"
pick() { if [ -e ".gpudata/$1" ]; then echo ".gpudata/$1"; else echo "../shared/data/$1"; fi; }
DATA="${DATA:-$(pick train)}"
EVAL="${EVAL:-$(pick eval/drealsr_x4)}"
NIQE="${NIQE:-$(pick metrics/niqe_pris_params.npz)}"
TEACHER_MIN="${TEACHER_MIN:-3.5}"
CROP="${CROP:-128}"  # HR training crop of teacher and students (128: the tile size; the CPU recipe: 64)
BATCH="${BATCH:-32}"
STUDENT_MIN="${STUDENT_MIN:-1.75}"
G2="${G2:-1.5}"
EVAL_PAIRS="${EVAL_PAIRS:-20}"
STEPS="${STEPS:-40}"  # the teacher's many-step rows
DEVICE="${DEVICE:-cuda}"
DEGRADE_ON="${DEGRADE_ON:-device}"  # device: the degradation on the GPU (workers: in the loader processes)
NW="${NW:-$(( $(nproc) - 2 ))}"
source benchmarks/gpu_env.sh
rm -rf "$W" && mkdir -p "$W" "$OUT_DIR"
start=$SECONDS
stamp() { echo "== $1 ($((SECONDS - start)) s)"; }
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'); $NW data workers; data $DATA"

pack() {  # whatever exists, even after a stage timed out
    (cd "$W" && find . -maxdepth 2 \( -name '*.log' -o -name '*.md' -o -name '*.json' -o -name '*.jsonl' \) -print0 \
        | tar czf "$OUT_DIR/logs.tar.gz" --null -T -)
    for m in teacher student-g1.0 "student-g$G2"; do
        [ -d "$W/model-$m" ] && tar cf "$OUT_DIR/$m.tar" -C "$W" "model-$m"
    done
}
trap pack EXIT

stamp "degradation on the device against the CPU"
"$PY" -m pytest -q -p no:cacheprovider tests/test_degrade.py -k cuda 2>&1 | tail -1

stamp "teacher, $TEACHER_MIN min, $CROP px crops, batch $BATCH"
timeout $(( ${TEACHER_MIN%.*} * 60 + 120 )) "$PY" -m training.teacher --preset tiny --data "$DATA" --output-dir "$W/teacher" \
    --crop "$CROP" --batch-size "$BATCH" --device "$DEVICE" --max-minutes "$TEACHER_MIN" --max-steps 1000000 --ema-decay 0.999 --degrade-on "$DEGRADE_ON" --num-workers "$NW" \
    --ckpt-every 1000 --log-every 100 >"$W/teacher.log" 2>&1
echo "teacher exit $?"; grep -E "reached|done:|Error|error" "$W/teacher.log" | tail -3; tail -1 "$W/teacher/log.jsonl"

stamp "diagnose"
timeout 60 "$PY" -m training.diagnose --teacher "$W/teacher" --data "$EVAL" --device "$DEVICE" \
    --steps "1,2,4,8,$STEPS" --json "$W/diagnose.json" >"$W/diagnose.log" 2>&1
echo "diagnose exit $?"; tail -4 "$W/diagnose.log"

stamp "students, $STUDENT_MIN min each"
pids=()
for g in 1.0 "$G2"; do
    timeout $(( ${STUDENT_MIN%.*} * 60 + 120 )) "$PY" -m training.distill --preset tiny --data "$DATA" \
        --teacher "$W/teacher" --output-dir "$W/student-g$g" --crop "$CROP" --batch-size "$BATCH" --device "$DEVICE" --guidance "$g" \
        --max-minutes "$STUDENT_MIN" --max-steps 1000000 --degrade-on "$DEGRADE_ON" --num-workers $(( NW / 2 )) --ckpt-every 1000 \
        --log-every 50 >"$W/student-g$g.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "student exit $?"; done
for g in 1.0 "$G2"; do grep -E "reached|done:|Error" "$W/student-g$g.log" | tail -2; tail -1 "$W/student-g$g/log.jsonl"; done

stamp "export"
"$PY" -m training.export "$W/teacher" "$W/model-teacher" >"$W/export.log" 2>&1
for g in 1.0 "$G2"; do "$PY" -m training.export "$W/student-g$g" "$W/model-student-g$g" >>"$W/export.log" 2>&1; done
tail -3 "$W/export.log"

stamp "evaluate, first $EVAL_PAIRS pairs"
ev() {  # name, then evaluate's arguments
    local name=$1; shift
    timeout 120 "$PY" -m mfsr_fast.evaluation --data "$EVAL" --limit "$EVAL_PAIRS" --niqe-params "$NIQE" \
        --device "$DEVICE" --output "$W/eval_$name.md" "$@" >"$W/eval_$name.log" 2>&1
}
ev base --methods "bicubic,teacher:1,teacher:$STEPS" --teacher "$W/teacher" &
ev cfg --methods "teacher:$STEPS:cfg$G2" --teacher "$W/teacher" &
ev g1.0 --methods student:1,student:2,student:4 --model "$W/model-student-g1.0" &
ev "g$G2" --methods student:1,student:2,student:4 --model "$W/model-student-g$G2" &
wait
for f in base cfg g1.0 "g$G2"; do echo "-- $f"; tail -8 "$W/eval_$f.log"; done
stamp "done"
