"""Does a teacher sample well with many steps? ``python -m training.diagnose --teacher DIR --data EVAL_DIR``.

Two rows of PSNR on centre crops of HR/LR pairs (the evaluation folders' layout):
- the teacher's clean-image estimate x_hat = z_t - t v(z_t, t) when z_t = (1 - t) x + t e is built from the *true*
  HR image x, at each t of ``--t-values``. An optimal estimator can only improve as t falls (it sees the LR image and
  a less noisy z_t), so a teacher whose estimate at mid t is worse than at t = 1 drifts under Euler sampling;
- the images Euler sampling of the teacher's velocity gives with each step count of ``--steps``, from the same noise,
  sampled as ``--sampling`` says (evaluate's teacher options: ``cfg1.5:refine0.5:above0.5`` is guidance 1.5 on the
  first step of the students' grid only; default: the uniform grid, no guidance).

A flow-matching teacher worth distilling in MFSR's way (one student step ~ many guided teacher steps) must gain from
steps; this table says whether it does before any distillation time is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from mfsr_fast.evaluation import metrics
from mfsr_fast.evaluation.methods import parse_sampling
from mfsr_fast.evaluation.runner import pairs, read_rgb, teacher_pipeline
from mfsr_fast.models.conditioning import lr_condition
from mfsr_fast.models.restorer import restore_crops
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import TeacherSampling
from mfsr_fast.sampling.guidance import sample_teacher


def centre_crops(root: str, limit: int, lr_crop: int, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR (N, 3, s c, s c), LR (N, 3, c, c)) in [0, 1]: the centre ``lr_crop`` of each LR image and the matching HR."""
    hrs, lrs = [], []
    for hr_path, lr_path in pairs(root)[:limit]:
        hr, lr = read_rgb(hr_path), read_rgb(lr_path)
        h, w = lr.shape[:2]
        if h < lr_crop or w < lr_crop or hr.shape[:2] != (scale * h, scale * w):
            print(f"skipping {os.path.basename(hr_path)}: LR {w} x {h} smaller than the crop {lr_crop} or HR not "
                  f"x{scale}", file=sys.stderr)
            continue
        y, x = (h - lr_crop) // 2, (w - lr_crop) // 2
        lrs.append(lr[y:y + lr_crop, x:x + lr_crop])
        hrs.append(hr[scale * y:scale * (y + lr_crop), scale * x:scale * (x + lr_crop)])
    if not hrs:
        raise SystemExit(f"{root}: no pair large enough for a {lr_crop} px LR crop")
    as_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    return as_t(hrs), as_t(lrs)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR (dB) of each image of the batch, as the evaluation measures it (8-bit RGB, 4 px border cropped)."""
    u8 = lambda x: (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    return [metrics.psnr(x, y) for x, y in zip(u8(a), u8(b))]


@torch.inference_mode()
def diagnose(pipe: MFSRPipeline, hr: torch.Tensor, lr: torch.Tensor, t_values, steps, *, seed: int = 0,
             batch: int = 8, sampling=None) -> dict:
    """{"x_hat": {t: PSNR}, "euler": {steps: PSNR}, "bicubic": PSNR} for the teacher on (hr, lr); the Euler samples
    as ``sampling`` (a ``guidance.TeacherSampling``; None: uniform grid, unguided) says."""
    teacher, codec, restorer = pipe.transformer, pipe.codec, pipe.restorer
    dev, dtype = pipe.device, pipe.dtype
    scale = hr.shape[-1] // lr.shape[-1]
    up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    out = {"bicubic": float(np.mean(_psnr(up, hr))), "x_hat": {}, "euler": {}}
    sampling = sampling or TeacherSampling()
    restored = restore_crops(restorer, lr.to(dev)).cpu() if restorer is not None else None
    if restored is not None:
        out["restorer"] = float(np.mean(_psnr(restored, hr)))
    g = torch.Generator().manual_seed(seed)
    for i in range(0, hr.shape[0], batch):
        h, low = hr[i:i + batch].to(dev), lr[i:i + batch].to(dev)
        c = lr_condition(teacher, codec, low, None if restored is None else restored[i:i + batch].to(dev))
        c = c.to(dtype)
        y = teacher.to_flow(codec.encode(h).float(), c.float())  # the flow's space (a residual for residual models)
        e = torch.randn(y.shape, generator=g).to(dev)
        ctx, pooled = teacher.prompt("positive", y.shape[0])
        for t in t_values:
            tt = torch.full((y.shape[0],), float(t), device=dev)
            z = (1 - t) * y + t * e
            v = teacher.field(z.to(dtype), c, tt, tt, ctx, pooled).float()
            est = codec.decode(teacher.from_flow(z - t * v, c.float())).clamp(0, 1)
            out["x_hat"].setdefault(t, []).extend(_psnr(est, hr[i:i + batch]))
        for n in steps:
            z = sample_teacher(teacher, c, e.to(dtype), steps=n, guidance=sampling).float()
            est = codec.decode(teacher.from_flow(z, c.float())).clamp(0, 1)
            out["euler"].setdefault(n, []).extend(_psnr(est, hr[i:i + batch]))
    out["x_hat"] = {t: float(np.mean(v)) for t, v in out["x_hat"].items()}
    out["euler"] = {n: float(np.mean(v)) for n, v in out["euler"].items()}
    return out


def table(name: str, res: dict) -> str:
    ts, ns = list(res["x_hat"]), list(res["euler"])
    r = "restorer" in res
    head = ("| teacher | " + " | ".join(f"x_hat t = {t:g}" for t in ts) + " | Euler " + " / ".join(map(str, ns))
            + " steps | bicubic |" + (" R(LR) |" if r else ""))
    row = (f"| {name} | " + " | ".join(f"{res['x_hat'][t]:.2f}" for t in ts) + " | "
           + " / ".join(f"{res['euler'][n]:.2f}" for n in ns) + f" | {res['bicubic']:.2f} |"
           + (f" {res['restorer']:.2f} |" if r else ""))
    return "\n".join([head, "|" + " --- |" * (len(ts) + 3 + r), row])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher run / checkpoint / model folder")
    ap.add_argument("--data", required=True, help="folder with HR/ and LR/ (e.g. ../shared/data/eval/drealsr_x4)")
    ap.add_argument("--limit", type=int, default=8, help="first N pairs")
    ap.add_argument("--crop", type=int, default=32, help="LR crop side (the default model's tile)")
    ap.add_argument("--t-values", default="1,0.8,0.6,0.4,0.2,0.1,0.05")
    ap.add_argument("--steps", default="1,2,4,8,40")
    ap.add_argument("--sampling", default="", help="how the Euler rows sample, as evaluate's teacher options: "
                    "[cfgW][:refineT][:aboveT], e.g. cfg1.5:refine0.5:above0.5 (default: uniform grid, no guidance)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    try:
        t_values = [float(v) for v in args.t_values.split(",") if v.strip()]
        steps = [int(v) for v in args.steps.split(",") if v.strip()]
    except ValueError:
        raise SystemExit("--t-values takes numbers in (0, 1], --steps positive integers, comma-separated") from None
    if not t_values or not steps or any(not 0 < t <= 1 for t in t_values) or any(n < 1 for n in steps):
        raise SystemExit("--t-values takes numbers in (0, 1], --steps positive integers, comma-separated")
    if args.limit < 1 or args.crop < 8:
        raise SystemExit("--limit must be >= 1 and --crop >= 8")
    try:
        sampling = parse_sampling(args.sampling.split(":") if args.sampling else [], flat=False)
    except ValueError:
        raise SystemExit(f"--sampling {args.sampling!r}: expected [cfgW][:refineT][:aboveT], e.g. "
                         "cfg1.5:refine0.5:above0.5") from None
    teacher = teacher_pipeline(args.teacher, args.device)
    hr, lr = centre_crops(args.data, args.limit, args.crop)
    res = diagnose(teacher, hr, lr, t_values, steps, seed=args.seed, sampling=sampling)
    print(f"{hr.shape[0]} centre crops of {args.data}, LR {args.crop} px, seed {args.seed}, Euler rows sampled as "
          f"{sampling}")
    print(table(args.teacher, res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"teacher": args.teacher, "data": args.data, "pairs": hr.shape[0], "crop": args.crop,
                       "sampling": dataclasses.asdict(sampling), **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
