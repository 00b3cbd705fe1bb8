#!/usr/bin/env bash
# Training and upscaling on CUDA, end to end at micro size (bf16 autocast, fp32 JVP, Triton kernels): teacher,
# distillation, export, upscale. Generated images; carried wheels in .whl/ as in gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
W=/tmp/mfsr_smoke
rm -rf $W && mkdir -p $W/imgs
"$PY" -c "
import numpy as np; from PIL import Image
r = np.random.default_rng(0)
for i in range(6):
    Image.fromarray(r.uniform(0, 255, (8, 8, 3)).astype(np.uint8)).resize((80, 72), Image.BICUBIC).save('$W/imgs/%d.png' % i)"
"$PY" -m training.teacher --preset micro --data $W/imgs --output-dir $W/teacher --device cuda --max-steps 4 \
    --model-overrides '{"num_layers": 1, "dual_attention_layers": [0], "num_heads": 2, "head_dim": 32}' 2>&1 | tail -2
"$PY" -m training.distill --preset micro --data $W/imgs --teacher $W/teacher --output-dir $W/student --device cuda \
    --max-steps 4 2>&1 | tail -2
"$PY" -m training.export $W/student $W/model 2>&1 | tail -1
"$PY" -c "
import numpy as np, torch
from mfsr_fast import upscale
img = (np.random.default_rng(1).uniform(0, 1, (40, 36, 3)) * 255).astype(np.uint8)
for dt in (torch.float32, torch.bfloat16):
    out = upscale(img, model='$W/model', device='cuda', dtype=dt, steps=2)
    print('upscale cuda', dt, out.shape, out.dtype, int(out.mean()))"
tail -1 $W/student/log.jsonl
