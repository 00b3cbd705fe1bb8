"""``make demo``: upscale real photographs with the embedded default model.

The photographs are scikit-image's bundled sample photos (astronaut, coffee, chelsea, rocket, motorcycle), which
ship inside the installed package: no download. Each is shrunk by 4 (area average) to make the low-resolution input,
then upscaled back by bicubic interpolation, by Real-ESRGAN x4plus (the reference every picture here is shown
beside, ``models.restorer``) and by MFSR in 1 and 4 steps as the model samples by default, and in 1 step with the
other setting of its sampler's ``flat_detail`` (restorer-conditioned models such as the default): 1, the model's raw
texture, for a model that takes its texture off where Real-ESRGAN's output is flat by itself (the default does,
``SamplerConfig.flat_detail``), 0.25 for one that does not. Written to ``outputs/demo/``: the outputs, a side-by-side
comparison per photo (LR | bicubic | Real-ESRGAN | MFSR 1 step | MFSR 1 step, flat_detail F | MFSR 4 steps |
original) and the time per image of each method (MFSR's includes the restorer it runs, for a restorer-conditioned
model).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data

from mfsr_fast.models.restorer import load_restorer
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.pipeline.upscale import cached_pipeline

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
FLAT_DETAIL = 0.25  # the comparison's flat_detail column for a model whose own is 1


def other_flat_detail(pipe: MFSRPipeline) -> float | None:
    """The flat_detail of the comparison's extra column: 1 (the raw texture) for a model whose sampler stores another,
    FLAT_DETAIL for one that stores 1; None for a model without a restorer (it has no flat_detail)."""
    if not pipe.composes:
        return None
    return 1.0 if pipe.sampler.flat_detail != 1 else FLAT_DETAIL


def photo(name: str, side: int) -> np.ndarray:
    """The bundled sample photo ``name``, its centre square crop of at most ``side`` px, RGB uint8."""
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    h, w = img.shape[:2]
    s = min(h, w, side)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s, :3]


def _label(im: Image.Image, text: str) -> Image.Image:
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, 8 * len(text) + 8, 16), fill=(0, 0, 0))
    d.text((4, 2), text, fill=(255, 255, 255))
    return im


def _save_figure(rows: list[list[Image.Image]], path: str) -> None:
    """Panels in a grid: a row per photo."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for i, panels in enumerate(rows):
        for j, p in enumerate(panels):
            grid.paste(p, (j * w, i * h))
    grid.save(path, optimize=True)


def _alt_label(alt: float | None) -> str:
    return f"MFSR 1 step, flat_detail {alt:g}" if alt is not None else "-"


def _timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def _methods(pipe: MFSRPipeline, realesrgan, alt: float | None) -> dict:
    """The comparison's upscalers by key: Real-ESRGAN, MFSR at 1 and 4 steps, and the other flat_detail at 1 step."""
    def restore(lr):
        x = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        r = realesrgan(x)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((r * 255).round().astype(np.uint8))

    methods = {"realesrgan": restore, 1: lambda lr: pipe(lr, steps=1), 4: lambda lr: pipe(lr, steps=4)}
    if alt is not None:
        other = pipe.with_sampler(dataclasses.replace(pipe.sampler, flat_detail=alt))
        methods["flat"] = lambda lr: other(lr, steps=1)
    return methods


def _photo_row(name: str, args, methods: dict, alt: float | None, figure: list) -> tuple:
    """One photo through every method: its files, its comparison, its row of times; its panels for ``--figure``
    appended to ``figure``."""
    alt_label = _alt_label(alt)
    hr = Image.fromarray(photo(name, args.side))
    lr = hr.resize((hr.width // 4, hr.height // 4), Image.BOX)
    bic = lr.resize(hr.size, Image.BICUBIC)
    outs, times = {}, {}
    for key, f in methods.items():
        outs[key], times[key] = _timed(lambda f=f: f(lr))
    files = {1: "mfsr_1step", 4: "mfsr_4step", "flat": f"mfsr_1step_flat{alt:g}" if alt is not None else ""}
    for key in (1, 4, "flat"):
        if key in outs:
            outs[key].save(os.path.join(args.output, f"{name}_{files[key]}.png"))
    lr.save(os.path.join(args.output, f"{name}_lr.png"))
    bic.save(os.path.join(args.output, f"{name}_bicubic.png"))
    outs["realesrgan"].save(os.path.join(args.output, f"{name}_realesrgan.png"))
    panels = [lr.resize(hr.size, Image.NEAREST), bic, outs["realesrgan"], outs[1], outs[4], hr]
    names = ["LR (nearest)", "bicubic", "Real-ESRGAN x4plus", "MFSR 1 step", "MFSR 4 steps", "original"]
    if "flat" in outs:
        panels.insert(4, outs["flat"])
        names.insert(4, alt_label)
    figure.append([_label(p.convert("RGB").copy(), n) for p, n in zip(panels, names)
                   if n in ("LR (nearest)", "Real-ESRGAN x4plus", "MFSR 1 step", "original")])
    side = Image.new("RGB", (hr.width * len(panels), hr.height))
    for i, (p, n) in enumerate(zip(panels, names)):
        side.paste(_label(p.convert("RGB").copy(), n), (i * hr.width, 0))
    path = os.path.join(args.output, f"{name}_comparison.png")
    side.save(path)
    tf = f"{times['flat']:.2f}" if "flat" in times else "-"
    print(f"{name}: {lr.width}x{lr.height} -> {hr.width}x{hr.height}: Real-ESRGAN {times['realesrgan']:.2f} s, "
          f"MFSR 1 step {times[1]:.2f} s ({alt_label}: {tf} s), 4 steps {times[4]:.2f} s -> {path}")
    return name, lr.size, times["realesrgan"], times[1], tf, times[4]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="outputs/demo")
    ap.add_argument("--side", type=int, default=384, help="HR crop side in pixels (LR is side / 4)")
    ap.add_argument("--photos", nargs="*", default=list(PHOTOS))
    ap.add_argument("--device", default=None)
    ap.add_argument("--figure", default=None, metavar="PNG", help="also write LR | Real-ESRGAN | MFSR 1 step | "
                    "original, a row per photo, to this file (the README's picture)")
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    try:
        pipe = cached_pipeline("default", args.device)
        realesrgan = load_restorer(device=pipe.device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = pipe.transformer
    print(f"model: embedded default ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"
          + (f", over {model.cfg.restorer}" if model.needs_restorer else "")
          + (f", flat_detail {pipe.sampler.flat_detail:g}" if pipe.sampler.flat_detail != 1 else "")
          + f"), device {pipe.device}, {pipe.precision}; Real-ESRGAN in float32")
    alt = other_flat_detail(pipe)
    alt_label = _alt_label(alt)
    methods = _methods(pipe, realesrgan, alt)
    figure: list = []
    rows = [_photo_row(name, args, methods, alt, figure) for name in args.photos]
    if args.figure:
        _save_figure(figure, args.figure)
    with open(os.path.join(args.output, "times.md"), "w") as f:
        f.write(f"| photo | LR size | Real-ESRGAN (s) | MFSR 1 step (s) | {alt_label} (s) | "
                "MFSR 4 steps (s) |\n| --- | --- | --- | --- | --- | --- |\n")
        for name, size, tr, t1, tf, t4 in rows:
            f.write(f"| {name} | {size[0]}x{size[1]} | {tr:.2f} | {t1:.2f} | {tf} | {t4:.2f} |\n")
    print(f"outputs, comparisons and times.md in {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
