"""Paper-style evaluation: ``python -m mfsr_fast.evaluate --data DIR [--teacher DIR] --niqe-params FILE``.

DIR holds ``HR/`` and ``LR/`` (pairs matched by name, ignoring 'HR' / 'LR' tokens). Methods (``--methods``):
``bicubic``; ``realesrgan`` (Real-ESRGAN x4plus alone, ``mfsr_fast.restorer``); ``student:N`` (the MeanFlow student,
N steps, NFE N, on its config's grid and jumps), optionally ``:refineT`` (another grid: the first jump to T, then
N - 1 equal ones; with ``:above`` the N - 1 equal ones go from 1 down to T, then one jump to 0) and ``:endpoint`` or
``:average`` (the kind of jump, ``meanflow.sample``), ``:detailD`` (the share D of its texture over R(LR) kept,
``upscale(detail=)``) and ``:flatD`` (that share where R(LR) is flat only, ``upscale(flat_detail=)``), e.g.
``student:2:refine0.25:endpoint``, ``student:4:refine0.7:endpoint:above``, ``student:1:detail0.5`` or
``student:1:flat0.25``; ``teacher:N`` (N Euler steps, NFE N) and ``teacher:N:cfgW`` (N steps with
guidance w against the negative prompt, NFE 2N), optionally ``:refineT`` (the first step from t = 1 straight to T,
then N - 1 equal steps), ``:aboveT`` (guidance only at the steps with t > T, the others one pass each) and ``:flatD``
(as a student's: its samples composed with R(LR) where that is flat), e.g.
``teacher:40:cfg1.5:refine0.5:above0.5`` (``guidance.TeacherSampling``). More students in the same run (one R(LR)
per image for all, one table): ``--student NAME=FOLDER`` (repeatable), measured as ``NAME:N[:refineT][:jump]``
like ``student:N``, e.g. ``--student grown=runs/gpu-grown --methods realesrgan,student:1,grown:1``. For each:
NFE, seconds per image, PSNR and SSIM (RGB and Y, ``--border`` pixels cropped, 4 by default as for x4 in the
literature), the texture against the photo (``metrics.texture_ratios``: on the HR's flattest quarter, above 1 is
grain or mottle NIQE can reward; on its busiest, below 1 is blur NIQE barely sees) and NIQE (Y, whole image, lower
is better), as a Markdown table. ``--save-images DIR`` keeps every
output to look at (the numbers alone can hide grain or blur), ``--per-image CSV`` each image's numbers (for paired
comparisons; written as they are measured); ``--skip`` and ``--limit`` pick a run of pairs.
Restorer-conditioned models share one R(LR) per image within a run: it is computed once (timed) and its time is
added to each such method's seconds per image, so every row's time is what that method costs on its own. With
``--lpips`` / ``--dists`` and ``--perceptual-weights DIR`` (local VGG16, LPIPS and DISTS weight files, see
``mfsr_fast.perceptual``), LPIPS and DISTS columns too (lower is better); without the folder they say where the files
come from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image

from mfsr_fast import metrics
from mfsr_fast.guidance import TeacherSampling
from mfsr_fast.meanflow import JUMPS, REFINE_SIDES, StudentSampling


def pairs(root: str) -> list[tuple[str, str]]:
    hr_dir, lr_dir = os.path.join(root, "HR"), os.path.join(root, "LR")
    if not (os.path.isdir(hr_dir) and os.path.isdir(lr_dir)):
        raise SystemExit(f"{root}: expected HR/ and LR/ sub-folders")
    key = lambda f: re.sub(r"[_-]?(HR|LR)(?=[_.-]|$)", "", os.path.splitext(f)[0])  # noqa: E731
    lrs = {key(f): f for f in os.listdir(lr_dir)}
    out = []
    for f in sorted(os.listdir(hr_dir)):
        if key(f) in lrs:
            out.append((os.path.join(hr_dir, f), os.path.join(lr_dir, lrs[key(f)])))
    if not out:
        raise SystemExit(f"{root}: no HR/LR pairs found")
    return out


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


_TEACHER_OPTIONS = {"cfg": "guidance", "refine": "refine_t", "above": "above", "flat": "flat_detail"}
METHODS_HELP = ("bicubic, realesrgan, student:N[:refineT][:endpoint|:average][:below|:above][:detailD][:flatD], "
                "teacher:N[:cfgW][:refineT][:aboveT][:flatD], NAME:N[...] as student for a --student NAME=FOLDER, e.g. "
                "student:2:refine0.25:endpoint, student:4:refine0.7:endpoint:above, student:1:detail0.5, "
                "student:1:flat0.25, "
                "teacher:40:cfg1.5 or "
                "teacher:40:cfg1.5:refine0.5:above0.5")
RESERVED = ("bicubic", "realesrgan", "student", "teacher")  # method kinds: not names of --student


def parse_sampling(parts: list[str], flat: bool = True) -> TeacherSampling:
    """The teacher options ['cfgW', 'refineT', 'aboveT', 'flatD'] (any of them, each once) -> a ``TeacherSampling``;
    ValueError otherwise. ``flat=False``: 'flatD' refused too (for samplers in the flow's space, where there is no
    decoded output to compose with R(LR): ``training.trajectories``, ``training.diagnose``)."""
    opts = {}
    for part in parts:
        name = next((k for k in _TEACHER_OPTIONS if part.startswith(k)), None)
        if name is None or _TEACHER_OPTIONS[name] in opts or (name == "flat" and not flat):
            raise ValueError(part)
        opts[_TEACHER_OPTIONS[name]] = float(part[len(name):])
    above = opts.pop("above", 0.0)
    return TeacherSampling(**opts, interval=(above, 1.0))


def parse_student(parts: list[str]) -> dict:
    """The student options ['refineT', 'endpoint' | 'average', 'below' | 'above', 'detailD', 'flatD'] (any of them, each
    once) -> the ``StudentSampling`` fields they set (the others stay the model's own); ValueError otherwise."""
    opts = {}
    for part in parts:
        if part.startswith("refine") and "refine_t" not in opts:
            opts["refine_t"] = float(part[len("refine"):])
        elif part.startswith("detail") and "detail" not in opts:
            opts["detail"] = float(part[len("detail"):])
        elif part.startswith("flat") and "flat_detail" not in opts:
            opts["flat_detail"] = float(part[len("flat"):])
        elif part in JUMPS and "jump" not in opts:
            opts["jump"] = part
        elif part in REFINE_SIDES and "refine_side" not in opts:
            opts["refine_side"] = part
        else:
            raise ValueError(part)
    StudentSampling(**opts)  # the values' ranges
    return opts


def parse_method(method: str, names=()) -> tuple[str, int, TeacherSampling | dict | None]:
    """'bicubic' | 'realesrgan' | 'student:N[:refineT][:jump][:side][:detailD][:flatD]'
    | 'teacher:N[:cfgW][:refineT][:aboveT][:flatD]'
    | 'NAME:N[...]' for a NAME in ``names`` (another student, options as for 'student')
    -> (kind, steps, how): for a teacher the ``TeacherSampling``, for a student the ``StudentSampling`` fields that
    replace its config's (``parse_student``), None for the others; SystemExit otherwise. ``cfgW``: guidance w
    (against the negative prompt); ``refineT``: first step from 1 straight to T; ``aboveT``: guidance only at steps
    with t > T; ``flatD``: the output composed with R(LR) where R(LR) is flat, as a student's ``:flatD``."""
    kind, *rest = method.split(":")
    try:
        if kind in ("bicubic", "realesrgan") and not rest:
            return kind, 0 if kind == "bicubic" else 1, None
        if kind == "student" or kind in names:
            steps = int(rest[0]) if rest else 1
            if steps >= 1:
                return kind, steps, parse_student(rest[1:])
        if kind == "teacher":
            steps = int(rest[0]) if rest else 1
            if steps >= 1:
                return kind, steps, parse_sampling(rest[1:])
    except ValueError:
        pass
    raise SystemExit(f"unknown method {method!r} ({METHODS_HELP})")


class RestoredCache:
    """R(LR) for the image in hand, computed once and shared by every method that needs it; ``seconds`` is what it
    cost, added to each such method's time."""

    def __init__(self, device=None):
        self.device, self.key, self.value, self.seconds = device, None, None, 0.0
        self._restorer = None

    def restorer(self):
        if self._restorer is None:
            from mfsr_fast.restorer import load_restorer

            try:
                self._restorer = load_restorer(device=self.device)
            except ValueError as e:
                raise SystemExit(f"realesrgan: {e}") from None
        return self._restorer

    def get(self, key: str, x: torch.Tensor, restorer=None) -> tuple[torch.Tensor, float, bool]:
        """(R(x), seconds it took, whether this call computed it) for image ``key``."""
        r = restorer or self.restorer()
        key = (key, os.path.abspath(r.path) if r.path else id(r))  # a model may carry a restorer of its own
        fresh = self.key != key
        if fresh:
            t0 = time.perf_counter()
            self.value = r(x.to(r.device))
            self.seconds = time.perf_counter() - t0
            self.key = key
        return self.value, self.seconds, fresh


def run_method(method: str, lr: np.ndarray, hr_shape, student, teacher, seed: int, tile: int | None = None,
               cache: RestoredCache | None = None, key: str = "", others: dict | None = None
               ) -> tuple[np.ndarray, int, float]:
    """(SR uint8 image, NFE, seconds to charge for R(LR) beyond this call's own time): a method that used the
    cached R(LR) of an earlier method is charged what computing it cost; one that computed it, nothing more.
    ``others``: more students by name (``NAME:N`` methods)."""
    from mfsr_fast.inference import _bicubic, restorer_of, upscale_rgb

    x = torch.from_numpy(np.ascontiguousarray(lr).copy()).permute(2, 0, 1)[None].float() / 255
    h, w = hr_shape[:2]
    cache = cache or RestoredCache()
    key = key or str(id(lr))
    if method == "bicubic":
        return np.asarray(Image.fromarray(lr).resize((w, h), Image.BICUBIC)), 0, 0.0

    def finish(out):
        return _to_uint8(_bicubic(out, (h, w)) if out.shape[-2:] != (h, w) else out)

    others = others or {}
    kind, steps, how = parse_method(method, others)
    if kind == "realesrgan":
        out, sec, fresh = cache.get(key, x)
        return finish(out), 1, 0.0 if fresh else sec
    model = teacher if kind == "teacher" else others.get(kind, student)
    if model is None:
        raise SystemExit(f"method {method}: pass --teacher DIR")
    dev = next(model.parameters()).device
    restored, sec = None, 0.0
    if model.needs_restorer:
        restored, sec, fresh = cache.get(key, x, restorer_of(model))
        sec = 0.0 if fresh else sec
    nfe = steps + (1 if restored is not None else 0)  # R counts as one network pass
    if kind != "teacher":
        sampling = dataclasses.replace(StudentSampling.of(model.cfg), **how) if how else None
        out = upscale_rgb(model, x.to(dev), steps=steps, seed=seed, tile=tile, restored=restored,
                          student_sampling=sampling)
        return finish(out), nfe, sec
    out = upscale_rgb(teacher, x.to(dev), steps=steps, seed=seed, tile=tile, teacher_guidance=how,
                      restored=restored)
    return finish(out), nfe - steps + how.nfe(steps), sec


def load_teacher(path: str, device=None, prompts: str | None = None, vae: str | None = None):
    """A teacher for the teacher:* methods: a training run / checkpoint / model folder (``find_weights``) or a
    DiT4SR / SD3.5 folder, with prompt embeddings from ``prompts`` and the VAE from ``vae`` when it needs them."""
    from mfsr_fast.codec import VAECodec
    from mfsr_fast.convert import load_teacher as load
    from mfsr_fast.inference import attach_codec, find_weights, resolve_device

    dev = resolve_device(device)
    try:
        try:
            folder = find_weights(path)
        except ValueError:
            folder = path  # a DiT4SR / SD3.5 folder: load_transformer says what is wrong with it
        teacher, _ = load(folder, prompts=prompts)
        teacher = teacher.to(dev).eval().requires_grad_(False)
        teacher._mfsr_dir = folder  # where a carried restorer is looked up
        if teacher.cfg.codec == "sd3-vae":
            if not vae:
                raise ValueError("the teacher works in SD3 VAE latents: pass --vae")
            attach_codec(teacher, VAECodec.from_pretrained(vae, device=dev))
    except ValueError as e:
        raise SystemExit(f"--teacher: {e}") from None
    return teacher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = ap.parse_args(argv)
    if args.limit < 0 or args.skip < 0:
        raise SystemExit("--limit and --skip must be >= 0")
    for flag, path in (("--save-images", args.save_images), ("--per-image", args.per_image),
                       ("--output", args.output)):
        # Checked before any model loads or image is upscaled, so a typo costs nothing.
        if path is None:
            continue
        folder = path if flag == "--save-images" else os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{flag} {path}: cannot create {folder}: {e.strerror}") from None
    perceptual, show = None, []
    if args.lpips or args.dists or args.perceptual_weights:
        from mfsr_fast.inference import resolve_device
        from mfsr_fast.perceptual import WEIGHTS_HELP, Perceptual

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
    from mfsr_fast.inference import _check_detail, load_model

    items = pairs(args.data)[args.skip:]
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise SystemExit(f"{args.data}: no pairs left after --skip {args.skip}")
    named = {}
    for spec in args.student:
        name, sep, folder = spec.partition("=")
        if not sep or not name.isidentifier() or not folder or name in RESERVED or name in named:
            raise SystemExit(f"--student {spec!r}: give NAME=FOLDER, NAME a new word other than "
                             f"{', '.join(RESERVED)}")
        named[name] = folder
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    parsed = {m: parse_method(m, named) for m in methods}  # a typo fails before any model loads
    student = load_model(args.model, args.device) if any(m.split(":")[0] == "student" for m in methods) else None
    others = {}
    for name, folder in named.items():
        try:
            others[name] = load_model(folder, args.device)
        except ValueError as e:
            raise SystemExit(f"--student {name}={folder}: {e}") from None
    for m, (kind, _, how) in parsed.items():  # a detail below 1 needs a model whose flow has a base (R(LR))
        if kind not in ("bicubic", "realesrgan", "teacher") and how and ("detail" in how or "flat_detail" in how):
            try:
                _check_detail(others.get(kind, student), how.get("detail", 1.0), how.get("flat_detail", 1.0))
            except ValueError as e:
                raise SystemExit(f"method {m}: {e}") from None
    teacher = None
    if args.teacher:
        teacher = load_teacher(args.teacher, args.device, args.prompts, args.vae)
        for m, (kind, _, how) in parsed.items():  # flatD needs a restorer-conditioned teacher
            if kind == "teacher":
                try:
                    _check_detail(teacher, 1.0, how.flat_detail)
                except ValueError as e:
                    raise SystemExit(f"method {m}: {e}") from None
    if args.border < 0:
        raise SystemExit("--border must be >= 0")
    from mfsr_fast.inference import resolve_device

    cache = RestoredCache(resolve_device(args.device))
    accs = {m: {"psnr": [], "ssim": [], "psnr_y": [], "ssim_y": [], "tex_flat": [], "tex_busy": [], "niqe": [],
                "lpips": [], "dists": [], "sec": []} for m in methods}
    nfes = dict.fromkeys(methods, 0)
    b = args.border
    # --per-image: one row per image and method, flushed as it is measured, so that a long run stopped early
    # keeps what it measured.
    measures = (["sec", "psnr", "ssim", "psnr_y", "ssim_y", "tex_flat", "tex_busy"]
                + (["niqe"] if params is not None else []) + show)
    rows_out = open(args.per_image, "w", newline="") if args.per_image else None
    writer = csv.writer(rows_out) if rows_out else None
    if writer:
        writer.writerow(["image", "method", "nfe", "seconds", *measures[1:]])
    shots = {m: os.path.join(args.save_images, m.replace(":", "_")) for m in methods} if args.save_images else {}
    for folder in shots.values():
        os.makedirs(folder, exist_ok=True)
    # Image by image, every method on it (so one R(LR) serves all the methods that need it).
    from tqdm import tqdm

    for hr_path, lr_path in tqdm(items, desc="evaluate", unit="image", file=sys.stderr, leave=False):
        hr, lr = _rgb(hr_path), _rgb(lr_path)
        name = os.path.splitext(os.path.basename(hr_path))[0]
        for method in methods:
            acc = accs[method]
            t0 = time.perf_counter()
            sr, nfes[method], charge = run_method(method, lr, hr.shape, student, teacher, args.seed, args.tile,
                                                  cache, lr_path, others)
            acc["sec"].append(time.perf_counter() - t0 + charge)
            acc["psnr"].append(metrics.psnr(sr, hr, border=b))
            acc["ssim"].append(metrics.ssim(sr, hr, border=b))
            acc["psnr_y"].append(metrics.psnr(sr, hr, border=b, y=True))
            acc["ssim_y"].append(metrics.ssim(sr, hr, border=b, y=True))
            flat, busy = metrics.texture_ratios(sr, hr, border=b)
            acc["tex_flat"].append(flat)
            acc["tex_busy"].append(busy)
            if params is not None:
                acc["niqe"].append(metrics.niqe_rgb(sr, params))
            if perceptual is not None:
                for k, v in perceptual(sr, hr).items():
                    acc[k].append(v)
            if writer:
                writer.writerow([name, method, nfes[method], *(f"{acc[k][-1]:.6g}" for k in measures)])
                rows_out.flush()
            if method in shots:
                Image.fromarray(sr).save(os.path.join(shots[method], name + ".png"))
    rows = []
    for method in methods:
        mean = {k: float(np.mean(v)) if v else float("nan") for k, v in accs[method].items()}
        rows.append((method, nfes[method], mean))
        print(f"{method}: PSNR {mean['psnr']:.2f} SSIM {mean['ssim']:.4f} NIQE {mean['niqe']:.3f} "
              f"({mean['sec']:.2f} s/img)", file=sys.stderr, flush=True)
    extra = "".join(f" {k.upper()} |" for k in show)
    lines = [f"{os.path.basename(os.path.normpath(args.data))}, {len(items)} images, PSNR / SSIM with {b} px border "
             "cropped; texture, flat / busy: the output's RMS high-frequency amplitude (Y) over the HR's on the HR's "
             "flattest / busiest quarter of pixels, mean over images (1: the photo's; flat above 1: grain or mottle "
             "the photo does not have; busy below 1: detail lost)",
             "", "| method | NFE | s / image | PSNR | SSIM | PSNR-Y | SSIM-Y | texture, flat | texture, busy | NIQE |"
             + extra,
             "| --- " * (10 + len(show)) + "|"]
    for method, nfe, m in rows:
        lines.append(f"| {method} | {nfe} | {m['sec']:.2f} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['psnr_y']:.2f} "
                     f"| {m['ssim_y']:.4f} | {m['tex_flat']:.2f} | {m['tex_busy']:.2f} | {m['niqe']:.3f} |"
                     + "".join(f" {m[k]:.4f} |" for k in show))
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    if rows_out:
        rows_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
