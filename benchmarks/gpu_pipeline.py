"""Where a training step's time goes: ``python benchmarks/gpu_pipeline.py [--data DIR] [--batch N] [--preset P]``.

Times each part of a teacher step of ``training.teacher`` on its own (median of a few runs, CUDA synchronised):
  - one batch of fresh crops degraded on the CPU in this process (what one data-loading worker makes per batch with
    ``--degrade-on workers``), and the same crops without the degradation;
  - the degradation of that batch on the device (``--degrade-on device``: one sample at a time);
  - the restorer on the batch's LR crops (restorer-conditioned presets: ``tiny-r``), as training runs it, and under
    bf16 autocast for comparison;
  - the optimizer step itself (loss, backward, AdamW) on a ready batch.
and prints the ceilings they put on steps per second: the data-loading processes together (``--workers``, assuming a
core each) against the main process (restorer + step, + the degradation where it runs on the device). What bounds the
GPU chain's training speed (docs/results/training-cost.md) is what this says.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import median_seconds  # noqa: E402
from mfsr_fast.models.restorer import load_restorer, restore_crops  # noqa: E402
from mfsr_fast.models.transformer import MFSRTransformer  # noqa: E402
from training import teacher  # noqa: E402
from training.batches import StepBatches, degrade_samples  # noqa: E402
from training.components import codec_for  # noqa: E402
from training.distributed import Dist, FieldModule, training_device  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=".gpudata/train" if os.path.isdir(".gpudata/train") else "../shared/data/train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="tiny-r", help="training.teacher preset")
    ap.add_argument("--workers", type=int, default=12, help="data-loading processes the ceiling assumes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    return ap


def _data_rows(cfg, d: Dist, reps: int) -> tuple[list[tuple[str, float]], tuple]:
    """The data parts' rows, and a degraded batch (hr, lr, seeds) on the device."""
    try:
        data = StepBatches(cfg, 0, 1, degrade=True)
        plain = StepBatches(cfg, 0, 1, degrade=False)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"gpu_pipeline: {e}") from None
    step_no = iter(range(10**6))
    rows = [("batch on the CPU, degraded (one worker)", median_seconds(lambda: data[next(step_no)], reps)),
            ("batch on the CPU, not degraded", median_seconds(lambda: plain[next(step_no)], reps))]
    hr_cpu, seeds = plain[0]
    hr_dev = hr_cpu.to(d.device)
    rows.append(("degradation on the device", median_seconds(
        lambda: degrade_samples(hr_dev, seeds, data.degradation), reps)))
    hr, lr = degrade_samples(hr_dev, seeds, data.degradation)
    return rows, (hr, lr, seeds)


def _restorer_rows(model: MFSRTransformer, lr: torch.Tensor, d: Dist, reps: int):
    """The restorer's rows (restorer-conditioned presets) and R(LR), or ([], None)."""
    if not model.needs_restorer:
        return [], None
    restorer = load_restorer(model.cfg.restorer, device=d.device)

    def restore_bf16():
        with torch.autocast(d.device.type, dtype=torch.bfloat16):
            return restore_crops(restorer, lr)

    rows = [("restorer on the device", median_seconds(lambda: restore_crops(restorer, lr), reps)),
            ("restorer on the device, bf16 autocast (not used)", median_seconds(restore_bf16, reps))]
    return rows, restore_crops(restorer, lr).clone()


def _step_seconds(cfg, model: MFSRTransformer, batch: tuple, d: Dist, reps: int) -> float:
    """One optimizer step (loss, backward, AdamW) on a ready batch."""
    loss_fn = teacher.make_loss(cfg, codec_for(model))
    field = FieldModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and d.device.type == "cuda"):
            loss = loss_fn(field, model, batch, 0, d)
        loss.backward()
        opt.step()
        return float(loss.detach())  # the training loop reads the loss back every step too

    return median_seconds(step, reps)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preset not in teacher.PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(teacher.PRESETS)}, got {args.preset!r}")
    if args.batch < 1 or args.reps < 1 or args.workers < 1:
        raise SystemExit("--batch, --reps and --workers must be positive")
    cfg = teacher.TeacherConfig(**dict(teacher.PRESETS[args.preset], data=args.data, batch_size=args.batch,
                                       max_steps=1000, device=args.device))
    d = Dist(device=training_device(cfg.device))
    rows, (hr, lr, seeds) = _data_rows(cfg, d, args.reps)
    torch.manual_seed(0)
    model = MFSRTransformer.from_preset(cfg.model_preset, **cfg.model_overrides).to(d.device)
    restorer_rows, restored = _restorer_rows(model, lr, d, args.reps)
    rows += restorer_rows
    rows.append(("optimizer step on a ready batch", _step_seconds(cfg, model, (hr, lr, restored, seeds), d,
                                                                  args.reps)))
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
