"""Watching a run: every ``--sample-every`` steps (and at the end) a PNG grid of fixed held-in crops and validation
metrics in ``log.jsonl``; ``--tensorboard`` logs the same scalars and images.

The grid (``<output-dir>/samples/step_NNNNNNN.png``) has one row per crop of the run's own data (the first
``--sample-count`` pool items, or the first images of ``--data`` cropped and degraded with fixed seeds) and the
columns LR (nearest) | bicubic | the EMA model at 1 step (a teacher: one Euler step; a student: 1 and 4 steps) | HR.
The metrics (PSNR-Y, SSIM-Y without border crop; NIQE with ``--niqe-params`` on images of at least 192 px) are
taken on the first ``--val-count`` pairs of ``--val-data`` (a folder with HR/ and LR/, e.g. DRealSR), or on the
held-in crops without it. Each is one row ``{"step", "kind": "val", "psnr_y@1", "ssim_y@1", ..., "seconds"}``
of log.jsonl (``seconds``: what the call cost).
Everything the model does not change (crops, R(LR), the pairs, bicubic) is prepared once at the start; a call costs
the model's passes on those images only. Off (``--sample-every 0``, the default) nothing here runs.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from mfsr_fast.evaluation.metrics import load_niqe_params, niqe_rgb, psnr, ssim
from mfsr_fast.evaluation.runner import pairs, read_rgb
from mfsr_fast.models.conditioning import bicubic
from mfsr_fast.models.restorer import load_restorer, restore_crops
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import SamplerConfig, TeacherSampling
from training.batches import degrade_samples, sample_seed
from training.components import codec_for


def _uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def fixed_crops(data, count: int):
    """(HR, LR, R(LR) or None) of the run's first ``count`` samples, the same at every call and on every rank."""
    if data.pool is not None:
        items = [data.pool[i] for i in range(min(count, len(data.pool)))]
        return tuple(torch.stack(parts) for parts in zip(*items))
    images = data.images
    images.set_epoch(0)
    hr = torch.stack([images[i] for i in range(min(count, len(images)))])
    seeds = torch.tensor([sample_seed(data.cfg.seed, -1, j) for j in range(hr.shape[0])], dtype=torch.long)
    hr, lr = degrade_samples(hr, seeds, data.degradation)
    return hr, lr, None


def _val_pairs(folder: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        found = pairs(folder)
    except SystemExit as e:
        raise SystemExit(f"--val-data: {e}") from None
    return [(read_rgb(lr), read_rgb(hr)) for hr, lr in found[:count]]


class Monitor:
    """``monitor(step, ema)``: the grid, the metrics (returned, and written to ``log`` on the main process)."""

    def __init__(self, cfg, data, model, *, sampler: SamplerConfig | None, device: torch.device, main: bool,
                 restorer=None):
        self.cfg, self.device, self.main = cfg, device, main
        self.steps = (1, 4) if sampler is not None else (1,)
        self.sampler = sampler if sampler is not None else TeacherSampling(guidance=1.0)  # a teacher: Euler steps
        self.folder = os.path.join(cfg.output_dir, "samples")
        self.niqe = None
        if cfg.niqe_params:
            try:
                self.niqe = load_niqe_params(cfg.niqe_params)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"--niqe-params: {e}") from None
        self.codec = None
        if model.cfg.codec != "pixel4":
            self.codec = codec_for(model, cfg.vae)
        hr, lr, r = fixed_crops(data, cfg.sample_count)
        if model.needs_restorer and restorer is None and (r is None or cfg.val_data):
            try:
                restorer = load_restorer(model.cfg.restorer, device=device)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        if model.needs_restorer and r is None:
            r = restore_crops(restorer, lr.to(device)).cpu()
        self.crops = (hr, lr, r if model.needs_restorer else None)
        self.restorer = restorer
        self.pairs = []  # (LR float (1, 3, h, w), HR uint8, R(LR) or None)
        if cfg.val_data:
            for lr_np, hr_np in _val_pairs(cfg.val_data, cfg.val_count):
                x = torch.from_numpy(lr_np.copy()).permute(2, 0, 1)[None].float() / 255
                rx = restorer(x.to(restorer.device)).cpu() if model.needs_restorer else None
                self.pairs.append((x, hr_np, rx))
        self.writer = None
        if cfg.tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard "
                                 "(or pip install 'mfsr-fast[train]')") from None
            self.writer = SummaryWriter(log_dir=os.path.join(cfg.output_dir, "tensorboard"))

    def _sample(self, pipe: MFSRPipeline, lr: torch.Tensor, restored, steps: int) -> torch.Tensor:
        restored = None if restored is None else restored.to(self.device)
        return pipe.upscale_rgb(lr.to(self.device), steps=steps, seed=0, restored=restored).cpu()

    @torch.no_grad()
    def __call__(self, step: int, ema, log=None) -> dict:
        t0 = time.perf_counter()
        pipe = MFSRPipeline(ema, self.codec, self.restorer, self.sampler)
        was_training = ema.training
        ema.eval()
        try:
            hr, lr, r = self.crops
            outs = {s: self._sample(pipe, lr, r, s) for s in self.steps}
            grid = self._grid(hr, lr, outs)
            rec = {"step": step, "kind": "val"}
            if self.pairs:
                for s in self.steps:
                    rows = [self._scores(_uint8(self._sample(pipe, x, rx, s)[0]), hr_np) for x, hr_np, rx in self.pairs]
                    rec.update(self._mean(rows, s))
            else:
                for s in self.steps:
                    rec.update(self._mean([self._scores(_uint8(o), _uint8(h)) for o, h in zip(outs[s], hr)], s))
        finally:
            ema.train(was_training)
        rec["seconds"] = round(time.perf_counter() - t0, 3)  # what this call cost the run
        if self.main:
            os.makedirs(self.folder, exist_ok=True)
            grid.save(os.path.join(self.folder, f"step_{step:07d}.png"))
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if self.writer is not None:
                for k, v in rec.items():
                    if "@" in k:
                        self.writer.add_scalar(f"val/{k}", v, step)
                self.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
                self.writer.flush()
        return rec

    def log_loss(self, rec: dict) -> None:
        if self.writer is not None:
            for k in ("loss", "grad_norm", "lr", *(k for k in rec if k.startswith("mse"))):
                self.writer.add_scalar(f"train/{k}", rec[k], rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _scores(self, out: np.ndarray, hr: np.ndarray) -> dict:
        s = {"psnr_y": psnr(out, hr, 0, y=True), "ssim_y": ssim(out, hr, 0, y=True)}
        if self.niqe is not None and min(out.shape[:2]) >= 192:  # NIQE needs two 96 px blocks a side
            s["niqe"] = niqe_rgb(out, self.niqe)
        return s

    @staticmethod
    def _mean(rows: list[dict], steps: int) -> dict:
        return {f"{k}@{steps}": float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def _grid(self, hr: torch.Tensor, lr: torch.Tensor, outs: dict) -> Image.Image:
        size = hr.shape[-2:]
        names = ["LR", "bicubic", *(f"{s} step{'s' if s > 1 else ''}" for s in outs), "HR"]
        cols = [torch.nn.functional.interpolate(lr.float(), size=size, mode="nearest"), bicubic(lr.float(), size),
                *(o for o in outs.values()), hr.float()]
        h, w = size
        label = 14
        canvas = Image.new("RGB", (w * len(cols), label + h * hr.shape[0]), "white")
        draw = ImageDraw.Draw(canvas)
        for j, (name, col) in enumerate(zip(names, cols)):
            draw.text((j * w + 3, 1), name, fill="black")
            for i in range(hr.shape[0]):
                canvas.paste(Image.fromarray(_uint8(col[i])), (j * w, label + i * h))
        return canvas
