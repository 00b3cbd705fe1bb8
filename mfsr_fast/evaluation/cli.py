"""Paper-style evaluation: ``python -m mfsr_fast.evaluation --data DIR [--teacher DIR] --niqe-params FILE``.

DIR holds ``HR/`` and ``LR/`` (pairs matched by name, ignoring 'HR' / 'LR' tokens). Methods (``--methods``, the
language of ``evaluation.methods``): ``bicubic``, ``realesrgan``, ``student:N[...]``, ``teacher:N[...]`` and
``NAME:N[...]`` for more students in the same run (``--student NAME=FOLDER``, repeatable: one R(LR) per image for
all, one table). For each: NFE, seconds per image, PSNR and SSIM (RGB and Y, ``--border`` pixels cropped, 4 by
default as for x4 in the literature), the texture against the photo (``metrics.texture_ratios``: on the HR's
flattest quarter, above 1 is grain or mottle NIQE can reward; on its busiest, below 1 is blur NIQE barely sees) and
NIQE (Y, whole image, lower is better), as a Markdown table. ``--save-images DIR`` keeps every output to look at (the
numbers alone can hide grain or blur), ``--per-image CSV`` each image's numbers (for paired comparisons);
``--skip`` and ``--limit`` pick a run of pairs. Restorer-conditioned models share one R(LR) per image: it is computed
once (timed) and its time is added to each such method's seconds per image, so every row's time is what that method
costs on its own. With ``--lpips`` / ``--dists`` and ``--perceptual-weights DIR`` (local VGG16, LPIPS and DISTS
weight files, see ``evaluation.perceptual``), LPIPS and DISTS columns too (lower is better).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from PIL import Image
from tqdm import tqdm

from mfsr_fast.evaluation import metrics
from mfsr_fast.evaluation.methods import RESERVED, parse_method
from mfsr_fast.evaluation.perceptual import WEIGHTS_HELP, Perceptual
from mfsr_fast.evaluation.report import Scores
from mfsr_fast.evaluation.runner import (
    RestoredCache,
    check_methods,
    pairs,
    read_rgb,
    run_method,
    teacher_pipeline,
)
from mfsr_fast.pipeline.loading import resolve_device
from mfsr_fast.pipeline.upscale import cached_pipeline


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mfsr_fast.evaluation", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with HR/ and LR/")
    ap.add_argument("--methods", default="bicubic,student:1,student:2,student:4")
    ap.add_argument("--model", default="default", help="the student: 'default' or a folder")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER",
                    help="another student, measured by the methods NAME:N[...] (repeatable)")
    ap.add_argument("--teacher", default=None, help="teacher run / checkpoint / model folder, or a DiT4SR / SD3.5 "
                    "transformer folder (for teacher:* methods)")
    ap.add_argument("--prompts", default=None, help="prompt-embedding file for a teacher that stores none (DiT4SR)")
    ap.add_argument("--vae", default=None, help="VAE folder for a teacher in SD3 VAE latents")
    ap.add_argument("--niqe-params", default=None, help="NIQE pristine parameters (.npz); without it, no NIQE")
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all), after --skip")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N pairs (sorted by HR name)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=None, help="LR tile side (default: as upscale(), the model's size)")
    ap.add_argument("--border", type=int, default=4, help="pixels cropped from each side for PSNR / SSIM (default "
                    "%(default)s, the x4 convention; 0 for DESIGN section 8's DRealSR numbers)")
    ap.add_argument("--lpips", action="store_true", help="LPIPS-VGG column (needs --perceptual-weights)")
    ap.add_argument("--dists", action="store_true", help="DISTS column (needs --perceptual-weights)")
    ap.add_argument("--perceptual-weights", default=None, metavar="DIR",
                    help="folder with vgg16-397923af.pth, vgg.pth (LPIPS v0.1) and weights.pt (DISTS)")
    ap.add_argument("--output", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--save-images", default=None, metavar="DIR",
                    help="write every output as DIR/METHOD/NAME.png (METHOD with ':' as '_'), to look at")
    ap.add_argument("--per-image", default=None, metavar="CSV",
                    help="write each image's numbers (one row per image and method) to this CSV file")
    return ap


def _output_folders(args) -> None:
    """Every output path's folder created before any model loads or image is upscaled, so a typo costs nothing."""
    if args.limit < 0 or args.skip < 0:
        raise SystemExit("--limit and --skip must be >= 0")
    for flag, path in (("--save-images", args.save_images), ("--per-image", args.per_image),
                       ("--output", args.output)):
        if path is None:
            continue
        folder = path if flag == "--save-images" else os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{flag} {path}: cannot create {folder}: {e.strerror}") from None


def _measures(args) -> tuple[Perceptual | None, list[str], dict | None]:
    """(LPIPS / DISTS measure or None, the columns it adds, NIQE parameters or None)."""
    perceptual, show = None, []
    if args.lpips or args.dists or args.perceptual_weights:
        if not args.perceptual_weights:
            raise SystemExit(f"--lpips / --dists: {WEIGHTS_HELP}")
        show = [k for k, on in (("lpips", args.lpips), ("dists", args.dists)) if on] or ["lpips", "dists"]
        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise SystemExit(f"--device: {e}") from None
        try:
            perceptual = Perceptual(args.perceptual_weights, device, measures=show)
        except ValueError as e:
            raise SystemExit(f"--perceptual-weights: {e}") from None
    params = None
    if args.niqe_params:
        try:
            params = metrics.load_niqe_params(args.niqe_params)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    else:
        print(f"NIQE skipped. {metrics.NIQE_HELP}", file=sys.stderr)
    return perceptual, show, params


def _models(args, methods: list[str]):
    """(the parsed methods, the student pipelines by name, the teacher pipeline or None), every method checked
    against its model; a typo in a method fails before any model loads."""
    named = {}
    for spec in args.student:
        name, sep, folder = spec.partition("=")
        if not sep or not name.isidentifier() or not folder or name in RESERVED or name in named:
            raise SystemExit(f"--student {spec!r}: give NAME=FOLDER, NAME a new word other than "
                             f"{', '.join(RESERVED)}")
        named[name] = folder
    parsed = {m: parse_method(m, named) for m in methods}
    students = {}
    if any(m.split(":")[0] == "student" for m in methods):
        students["student"] = cached_pipeline(args.model, args.device)
    for name, folder in named.items():
        try:
            students[name] = cached_pipeline(folder, args.device)
        except ValueError as e:
            raise SystemExit(f"--student {name}={folder}: {e}") from None
    teacher = teacher_pipeline(args.teacher, args.device, args.prompts, args.vae) if args.teacher else None
    check_methods(parsed, students, teacher)
    return students, teacher


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _output_folders(args)
    perceptual, show, params = _measures(args)
    items = pairs(args.data)[args.skip:]
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise SystemExit(f"{args.data}: no pairs left after --skip {args.skip}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    students, teacher = _models(args, methods)
    if args.border < 0:
        raise SystemExit("--border must be >= 0")
    cache = RestoredCache(resolve_device(args.device))
    scores = Scores(methods, args.border, params, perceptual, show, args.per_image)
    shots = {m: os.path.join(args.save_images, m.replace(":", "_")) for m in methods} if args.save_images else {}
    for folder in shots.values():
        os.makedirs(folder, exist_ok=True)
    # Image by image, every method on it (so one R(LR) serves all the methods that need it).
    for hr_path, lr_path in tqdm(items, desc="evaluate", unit="image", file=sys.stderr, leave=False):
        hr, lr = read_rgb(hr_path), read_rgb(lr_path)
        name = os.path.splitext(os.path.basename(hr_path))[0]
        for method in methods:
            t0 = time.perf_counter()
            sr, nfe, charge = run_method(method, lr, hr.shape, students, teacher, args.seed, args.tile, cache, lr_path)
            scores.add(name, method, sr, hr, nfe, time.perf_counter() - t0 + charge)
            if method in shots:
                Image.fromarray(sr).save(os.path.join(shots[method], name + ".png"))
    table = scores.table(args.data, len(items))
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    scores.close()
    return 0
