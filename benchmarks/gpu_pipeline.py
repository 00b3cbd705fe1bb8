"""Where a training step's time goes: ``python benchmarks/gpu_pipeline.py [--data DIR] [--batch N] [--preset P]``.

Times each part of a teacher step of ``training.teacher`` on its own (median of a few runs, CUDA synchronised):
  - one batch of fresh crops degraded on the CPU in this process (what one data-loading worker makes per batch with
    ``--degrade-on workers``), and the same crops without the degradation;
  - the degradation of that batch on the device (``--degrade-on device``: one sample at a time);
  - the restorer on the batch's LR crops (restorer-conditioned presets: ``tiny-r``), as training runs it, and under
    bf16 autocast for comparison;
  - the optimizer step itself (loss, backward, AdamW) on a ready batch.
and prints the ceilings they put on steps per second: the data-loading processes together (``--workers``, assuming a
core each) against the main process (restorer + step, + the degradation where it runs on the device).

Written after the first GPU run of benchmarks/gpu_restorer.sh (2026-12-04, NVIDIA H200): `tiny-r` at batch 64
trained at 0.41 steps/s degrading on the device and 1.39 steps/s with 12 data-loading processes, where the sixth
session's `tiny` (no restorer) had 10.4 steps/s at batch 32. This says which part to speed up.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import median_seconds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=".gpudata/train" if os.path.isdir(".gpudata/train") else "../shared/data/train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="tiny-r", help="training.teacher preset")
    ap.add_argument("--workers", type=int, default=12, help="data-loading processes the ceiling assumes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from training import engine, teacher
    from training.pool import restore_crops

    if args.preset not in teacher.PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(teacher.PRESETS)}, got {args.preset!r}")
    if args.batch < 1 or args.reps < 1 or args.workers < 1:
        raise SystemExit("--batch, --reps and --workers must be positive")
    cfg = teacher.TeacherConfig(**dict(teacher.PRESETS[args.preset], data=args.data, batch_size=args.batch,
                                       max_steps=1000, device=args.device))
    d = engine.Dist(device=engine.training_device(cfg.device))
    try:
        data = engine.StepBatches(cfg, 0, 1, degrade=True)
        plain = engine.StepBatches(cfg, 0, 1, degrade=False)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"gpu_pipeline: {e}") from None
    from mfsr_fast.model import MFSRTransformer

    torch.manual_seed(0)
    model = MFSRTransformer.from_preset(cfg.model_preset, **cfg.model_overrides).to(d.device)
    rows: list[tuple[str, float]] = []
    step_no = iter(range(10**6))
    rows.append(("batch on the CPU, degraded (one worker)", median_seconds(lambda: data[next(step_no)], args.reps)))
    rows.append(("batch on the CPU, not degraded", median_seconds(lambda: plain[next(step_no)], args.reps)))
    hr_cpu, seeds = plain[0]
    hr_dev = hr_cpu.to(d.device)
    rows.append(("degradation on the device", median_seconds(
        lambda: engine.degrade_samples(hr_dev, seeds, data.degradation), args.reps)))
    hr, lr = engine.degrade_samples(hr_dev, seeds, data.degradation)
    restored = None
    if model.needs_restorer:
        from mfsr_fast.restorer import load_restorer

        restorer = load_restorer(model.cfg.restorer, device=d.device)
        rows.append(("restorer on the device", median_seconds(lambda: restore_crops(restorer, lr), args.reps)))

        def restore_bf16():
            with torch.autocast(d.device.type, dtype=torch.bfloat16):
                return restore_crops(restorer, lr)

        rows.append(("restorer on the device, bf16 autocast (not used)", median_seconds(restore_bf16, args.reps)))
        restored = restore_crops(restorer, lr).clone()
    loss_fn = teacher.make_loss(cfg, engine.codec_for(model))
    field = engine._Field(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batch = (hr, lr, restored, seeds)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and d.device.type == "cuda"):
            loss = loss_fn(field, model, batch, 0, d)
        loss.backward()
        opt.step()
        return float(loss.detach())  # the engine reads the loss back every step too

    rows.append(("optimizer step on a ready batch", median_seconds(step, args.reps)))

    name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "CPU"
    print(f"{args.preset}, batch {args.batch}, {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
          f"median of {args.reps}")
    print("| part | s / batch |\n| --- | --- |")
    for part, s in rows:
        print(f"| {part} | {s:.4f} |")
    t = dict(rows)
    main_proc = t["optimizer step on a ready batch"] + t.get("restorer on the device", 0.0)
    workers = t["batch on the CPU, degraded (one worker)"] / args.workers
    print(f"ceiling, --degrade-on workers ({args.workers} processes): data {1 / workers:.2f} steps/s, main process "
          f"{1 / main_proc:.2f} steps/s")
    print(f"ceiling, --degrade-on device: main process {1 / (main_proc + t['degradation on the device']):.2f} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
