"""What an evaluation measures on each output, and the table it prints: PSNR and SSIM (RGB and Y), the texture against
the photo, NIQE and, with their weights, LPIPS and DISTS; means per method as a Markdown table, and each image's
numbers as CSV rows written as they are measured (a long run stopped early keeps what it measured)."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

from mfsr_fast.evaluation import metrics

BASE = ["sec", "psnr", "ssim", "psnr_y", "ssim_y", "tex_flat", "tex_busy"]


class Scores:
    """Every method's numbers, image by image; ``niqe`` the NIQE parameters (None: no NIQE), ``perceptual`` an
    ``evaluation.perceptual.Perceptual`` (None: no LPIPS / DISTS) and ``show`` its measures."""

    def __init__(self, methods: list[str], border: int, niqe: dict | None, perceptual=None, show=(),
                 per_image: str | None = None):
        self.methods, self.border, self.niqe, self.perceptual, self.show = methods, border, niqe, perceptual, list(show)
        self.measures = BASE + (["niqe"] if niqe is not None else []) + self.show
        self.values = {m: {k: [] for k in self.measures} for m in methods}
        self.nfe = dict.fromkeys(methods, 0)
        self.file = open(per_image, "w", newline="") if per_image else None
        self.writer = csv.writer(self.file) if self.file else None
        if self.writer:
            self.writer.writerow(["image", "method", "nfe", "seconds", *self.measures[1:]])

    def add(self, name: str, method: str, sr: np.ndarray, hr: np.ndarray, nfe: int, seconds: float) -> None:
        """Measure one output ``sr`` against its photo ``hr``."""
        b, acc = self.border, self.values[method]
        self.nfe[method] = nfe
        acc["sec"].append(seconds)
        acc["psnr"].append(metrics.psnr(sr, hr, border=b))
        acc["ssim"].append(metrics.ssim(sr, hr, border=b))
        acc["psnr_y"].append(metrics.psnr(sr, hr, border=b, y=True))
        acc["ssim_y"].append(metrics.ssim(sr, hr, border=b, y=True))
        flat, busy = metrics.texture_ratios(sr, hr, border=b)
        acc["tex_flat"].append(flat)
        acc["tex_busy"].append(busy)
        if self.niqe is not None:
            acc["niqe"].append(metrics.niqe_rgb(sr, self.niqe))
        if self.perceptual is not None:
            for k, v in self.perceptual(sr, hr).items():
                acc[k].append(v)
        if self.writer:
            self.writer.writerow([name, method, nfe, *(f"{acc[k][-1]:.6g}" for k in self.measures)])
            self.file.flush()

    def table(self, data: str, count: int) -> str:
        """The means per method as a Markdown table under a line that says what the columns are."""
        lines = [f"{os.path.basename(os.path.normpath(data))}, {count} images, PSNR / SSIM with {self.border} px "
                 "border cropped; texture, flat / busy: the output's RMS high-frequency amplitude (Y) over the HR's on "
                 "the HR's flattest / busiest quarter of pixels, mean over images (1: the photo's; flat above 1: grain "
                 "or mottle the photo does not have; busy below 1: detail lost)", "",
                 "| method | NFE | s / image | PSNR | SSIM | PSNR-Y | SSIM-Y | texture, flat | texture, busy | NIQE |"
                 + "".join(f" {k.upper()} |" for k in self.show), "| --- " * (10 + len(self.show)) + "|"]
        for method in self.methods:
            m = {k: float(np.mean(v)) if v else float("nan") for k, v in self.values[method].items()}
            m.setdefault("niqe", float("nan"))
            print(f"{method}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.4f} NIQE {m['niqe']:.3f} ({m['sec']:.2f} s/img)",
                  file=sys.stderr, flush=True)
            lines.append(f"| {method} | {self.nfe[method]} | {m['sec']:.2f} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                         f"{m['psnr_y']:.2f} | {m['ssim_y']:.4f} | {m['tex_flat']:.2f} | {m['tex_busy']:.2f} | "
                         f"{m['niqe']:.3f} |" + "".join(f" {m[k]:.4f} |" for k in self.show))
        return "\n".join(lines)

    def close(self) -> None:
        if self.file:
            self.file.close()
