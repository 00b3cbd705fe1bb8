"""Running the table's methods on HR/LR pairs: each method on each image, one R(LR) per image shared by every method
that needs it (``RestoredCache``), the outputs in uint8 at the HR's size."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np
import torch
from PIL import Image

from mfsr_fast.evaluation.methods import parse_method
from mfsr_fast.models.conditioning import bicubic
from mfsr_fast.models.restorer import load_restorer
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import TeacherSampling


def pairs(root: str) -> list[tuple[str, str]]:
    """(HR path, LR path) of every pair in ``root``'s HR/ and LR/, matched by name ignoring 'HR' / 'LR' tokens."""
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


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 of an image file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """The first image of a (B, 3, H, W) batch in [0, 1] -> (H, W, 3) uint8."""
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


class RestoredCache:
    """R(LR) for the image in hand, computed once and shared by every method that needs it; ``seconds`` is what it
    cost, added to each such method's time."""

    def __init__(self, device=None):
        self.device, self.key, self.value, self.seconds = device, None, None, 0.0
        self._restorer = None

    def restorer(self):
        if self._restorer is None:
            try:
                self._restorer = load_restorer(device=self.device)
            except ValueError as e:
                raise SystemExit(f"realesrgan: {e}") from None
        return self._restorer

    def get(self, key: str, x: torch.Tensor, restorer=None) -> tuple[torch.Tensor, float, bool]:
        """(R(x), seconds it took, whether this call computed it) for image ``key``."""
        r = restorer or self.restorer()
        # A model may carry a restorer of its own, or run it in another precision than Real-ESRGAN's float32 row.
        key = (key, os.path.abspath(r.path) if r.path else id(r), str(r.dtype))
        fresh = self.key != key
        if fresh:
            t0 = time.perf_counter()
            self.value = r(x.to(r.device))
            self.seconds = time.perf_counter() - t0
            self.key = key
        return self.value, self.seconds, fresh


def run_method(method: str, lr: np.ndarray, hr_shape, students: dict[str, MFSRPipeline],
               teacher: MFSRPipeline | None, seed: int, tile: int | None = None, cache: RestoredCache | None = None,
               key: str = "") -> tuple[np.ndarray, int, float]:
    """(SR uint8 image, NFE, seconds to charge for R(LR) beyond this call's own time): a method that used the
    cached R(LR) of an earlier method is charged what computing it cost; one that computed it, nothing more.
    ``students``: the student pipelines by name (``student`` and every ``--student NAME``)."""
    x = torch.from_numpy(np.ascontiguousarray(lr).copy()).permute(2, 0, 1)[None].float() / 255
    h, w = hr_shape[:2]
    cache = cache or RestoredCache()
    key = key or str(id(lr))
    if method == "bicubic":
        return np.asarray(Image.fromarray(lr).resize((w, h), Image.BICUBIC)), 0, 0.0

    def finish(out):
        return to_uint8(bicubic(out, (h, w)) if out.shape[-2:] != (h, w) else out)

    kind, steps, how = parse_method(method, students)
    if kind == "realesrgan":
        out, sec, fresh = cache.get(key, x)
        return finish(out), 1, 0.0 if fresh else sec
    if kind == "teacher" and teacher is None:
        raise SystemExit(f"method {method}: pass --teacher DIR")
    pipe = method_pipeline(kind, how, students, teacher)
    restored, sec = None, 0.0
    if pipe.restorer is not None:
        restored, sec, fresh = cache.get(key, x, pipe.restorer)
        sec = 0.0 if fresh else sec
    nfe = steps + (1 if restored is not None else 0)  # R counts as one network pass
    detail = how.get("detail", 1.0) if kind != "teacher" else 1.0
    out = pipe.upscale_rgb(x.to(pipe.device), steps=steps, seed=seed, tile=tile, restored=restored, detail=detail)
    if kind == "teacher":
        nfe += how.nfe(steps) - steps
    return finish(out), nfe, sec


def method_pipeline(kind: str, how, students: dict[str, MFSRPipeline], teacher: MFSRPipeline | None
                    ) -> MFSRPipeline:
    """The pipeline a student or teacher method runs: its model with the sampler the method's options give."""
    if kind == "teacher":
        return teacher.with_sampler(how)
    pipe = students[kind]
    fields = {k: v for k, v in how.items() if k != "detail"}
    return pipe.with_sampler(dataclasses.replace(pipe.sampler, **fields)) if fields else pipe


def check_methods(parsed: dict, students: dict[str, MFSRPipeline], teacher: MFSRPipeline | None) -> None:
    """Every method's options against its model, before any image is upscaled (a detail below 1 needs a base, a
    flat_detail below 1 a restorer-conditioned residual model): SystemExit naming the method."""
    for m, (kind, _, how) in parsed.items():
        if kind in ("bicubic", "realesrgan") or (kind == "teacher" and teacher is None):
            continue
        try:
            pipe = method_pipeline(kind, how, students, teacher)
            if kind != "teacher":
                pipe.check_detail(how.get("detail", 1.0))
        except ValueError as e:
            raise SystemExit(f"method {m}: {e}") from None


def teacher_pipeline(path: str, device=None, prompts: str | None = None, vae: str | None = None) -> MFSRPipeline:
    """``MFSRPipeline.from_teacher`` for the ``teacher:*`` methods, mistakes as one line naming ``--teacher``."""
    try:
        return MFSRPipeline.from_teacher(path, device=device, prompts=prompts, vae=vae, sampler=TeacherSampling())
    except ValueError as e:
        raise SystemExit(f"--teacher: {e}") from None
