"""``mfsr_fast.upscale``: x4 real-world super-resolution in 1 to 4 MeanFlow steps, for any image a user has.

The public API (``upscale``, ``upscale_array``, ``upscale_rgb``), input checks and the colour fix live here; loading
models in ``mfsr_fast.loading``, running one over tiles in ``mfsr_fast.tiling`` (both re-exported below).

Inputs: a path, a PIL image, a numpy array (H, W[, C]) of uint8 / uint16 / float in [0, 1], or a torch tensor
((C, H, W) or (B, C, H, W), float in [0, 1]). Output: a PIL image for a path or PIL input (a uint16 numpy array
when the file was 16-bit, which PIL cannot hold as RGB), the input's own type otherwise.

Large images are processed in overlapping tiles blended with a raised-cosine window, row band by row band, straight
into the output array (``mfsr_fast.tiling``: memory is the model, one row of tiles and the output); the noise is
drawn per block from the seed and the position, so overlapping tiles see the same noise and the output does not
depend on the tile size. The tile size comes from the free memory, and a CUDA out-of-memory error retries with
half the tile (``upscale_rgb``).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mfsr_fast.guidance import TeacherSampling, as_sampling
from mfsr_fast.imageio import ImageError, ImageMeta, array_to_pil, pil_to_array, read_image
from mfsr_fast.loading import (  # noqa: F401  (re-exported: the names callers import from here)
    DEFAULT_MODEL,
    DTYPES,
    MODEL_SCALE,
    attach_codec,
    attach_restorer,
    codec_of,
    find_weights,
    load_model,
    resolve_device,
    resolve_dtype,
    restorer_of,
)
from mfsr_fast.meanflow import StudentSampling
from mfsr_fast.model import MFSRTransformer
from mfsr_fast.tiling import (  # noqa: F401  (lr_condition, _bicubic: re-exported)
    RowSink,
    _bicubic,
    _rows,
    auto_tile,
    auto_tile_batch,
    lr_condition,
)

# Colour correction against the LR image.


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    C = x.shape[1]
    pad = 2 * dilation
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(C, 1, 1, 5).contiguous(), groups=C, dilation=(1, dilation))
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(C, 1, 5, 1).contiguous(), groups=C, dilation=(dilation, 1))


def _low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    for i in range(levels):
        x = _blur(x, 2 ** i)
    return x


def color_fix(out: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Match the colours of ``out`` to ``ref`` (the bicubic-upsampled LR): 'wavelet' swaps the low-frequency band,
    'adain' matches each channel's mean and standard deviation."""
    if method == "wavelet":
        return (out - _low(out) + _low(ref)).clamp(0, 1)
    if method == "adain":
        dims = (2, 3)
        mo, so = out.mean(dims, keepdim=True), out.std(dims, keepdim=True)
        mr, sr = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
        return ((out - mo) / (so + 1e-6) * sr + mr).clamp(0, 1)
    raise ValueError(f"color_fix must be None, 'wavelet' or 'adain', got {method!r}")


# The model on one (tile of an) RGB image.






















def upscale_rgb(model: MFSRTransformer, rgb: torch.Tensor, *, steps: int = 1, seed: int = 0, tile: int | None = None,
                overlap: int | None = None, progress: Callable[[int, int], None] | None = None,
                teacher_guidance: float | TeacherSampling | None = None, tile_batch: int | None = None,
                restored: torch.Tensor | None = None, student_sampling: StudentSampling | None = None
                ) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] on the model's device -> (B, 3, 4H, 4W), tiled when larger than ``tile`` LR pixels.
    ``teacher_guidance=w`` samples the model as a flow-matching teacher (Euler, CFG w at every step of a uniform
    grid; 1: no guidance); a ``guidance.TeacherSampling`` sets the grid and the guidance interval too.
    ``student_sampling`` (a ``meanflow.StudentSampling``) replaces the grid and the jumps a student takes (default:
    its config's ``refine_t`` and ``jump``).
    ``tile_batch``: tiles per model call (default ``auto_tile_batch``); the result does not depend on it beyond
    rounding, nor on the tile size through the noise (drawn per block from the seed and the position:
    ``tiling.noise_window``). A restorer-conditioned model runs its restorer band by band, each band as the whole
    image would (``Restorer.rows``); ``restored`` passes R(rgb) (B, 3, 4H, 4W) computed already. This returns the
    whole float output; ``upscale_array`` streams rows into the output array instead."""
    B, _, H, W = rgb.shape
    if teacher_guidance is not None:
        teacher_guidance = as_sampling(teacher_guidance)  # a wrong type fails here, before any tile runs
        if student_sampling is not None:
            raise ValueError("student_sampling is for a student's jumps; with teacher_guidance pass a TeacherSampling")
        _check_detail(model, 1.0, teacher_guidance.flat_detail)
    if student_sampling is not None and not isinstance(student_sampling, StudentSampling):
        raise TypeError(f"student_sampling must be a StudentSampling, got {type(student_sampling).__name__}")
    if student_sampling is not None:
        _check_detail(model, student_sampling.detail, student_sampling.flat_detail)
    tile = tile or auto_tile(model, rgb.device)
    group = tile_batch or auto_tile_batch(model, rgb.device, tile)
    while True:
        try:
            gen = _rows(model, rgb, steps=steps, seed=seed, tile=tile, overlap=overlap, progress=progress,
                        teacher_guidance=teacher_guidance, tile_batch=group, restored=restored,
                        student_sampling=student_sampling)
            out = torch.cat([rows for _, rows in gen], dim=2)
            break
        except torch.OutOfMemoryError as e:
            tile, group = _smaller(rgb.device, tile, group, e)
    return out[:, :, : MODEL_SCALE * H, : MODEL_SCALE * W]


def _smaller(device: torch.device, tile: int, group: int, err: Exception) -> tuple[int, int]:
    """After a CUDA out-of-memory error: half the tiles per call, then half the tile; ``err`` again at the floor."""
    if device.type != "cuda" or (tile <= 32 and group == 1):
        raise err
    torch.cuda.empty_cache()
    return (tile, group // 2) if group > 1 else (tile // 2, group)


# The public function.


def _as_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """numpy image -> (H, W, C) float32 in [0, 1] and its bit depth (8, 16, or 0 for float input)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"numpy image must be (H, W) or (H, W, C) with C in 1..4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, 16
    if np.issubdtype(arr.dtype, np.floating):
        return _checked_unit(arr.astype(np.float32), "numpy image"), 0
    raise ValueError(f"numpy image dtype must be uint8, uint16 or float, got {arr.dtype}")


def _check_steps_scale(steps, scale) -> tuple[int, float]:
    """steps: an integer in 1..64 (numpy integers too, not bool); scale: a real number in (0, 16] (not bool)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 64:
        raise ValueError(f"steps must be an integer in 1..64, got {steps!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    return int(steps), float(scale)


def _checked_unit(arr: np.ndarray, what: str) -> np.ndarray:
    """Every input type's one check of float pixels: finite, and in [0, 1] (values a rounding away are clipped;
    a 0-255 or 0-65535 float image is refused with the division it needs, instead of turning white)."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if hi > 1.5 or lo < -0.5:
        hint = " (divide by 255 for 8-bit values)" if hi <= 255 else " (divide by 65535 for 16-bit values)"
        raise ValueError(f"float {what} values must lie in [0, 1], got {lo:g}..{hi:g}{hint}")
    if hi > 1 + 1e-3 or lo < -1e-3:
        warnings.warn(f"float {what} values {lo:g}..{hi:g} clipped to [0, 1]", stacklevel=3)
    if lo >= 0 and hi <= 1:  # already in range: no copy (large inputs are checked twice on the numpy path)
        return arr.astype(np.float32, copy=False)
    return np.clip(arr, 0, 1).astype(np.float32, copy=False)


def _check_sampling(refine_t, jump, refine_side, detail=None, flat_detail=None) -> dict:
    """``upscale``'s sampling overrides (None: the model's own), checked before a model loads -> the
    ``StudentSampling`` fields they set."""
    numbers_given = (("refine_t", refine_t), ("detail", detail), ("flat_detail", flat_detail))
    for name, v in numbers_given:
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"{name} must be a number, got {v!r}")
    given = {k: float(v) for k, v in numbers_given if v is not None}
    given.update({k: v for k, v in (("jump", jump), ("refine_side", refine_side)) if v is not None})
    StudentSampling(**given)  # the ranges and names
    return given


def has_base(model: MFSRTransformer) -> bool:
    """Whether the model's flow runs over a base (R(LR) for a restorer-conditioned one), so that a ``detail`` below 1
    means something."""
    return model.cfg.residual_scale > 0


def _check_detail(model: MFSRTransformer, detail: float, flat_detail: float = 1.0) -> None:
    if detail != 1 and not has_base(model):
        raise ValueError(f"detail {detail} scales what a model adds to its base (R(LR)): this model's flow has no base "
                         "(residual_scale 0); use detail 1")
    if flat_detail != 1 and not (has_base(model) and model.needs_restorer):
        raise ValueError(f"flat_detail {flat_detail} scales what a model adds to Real-ESRGAN's output where that is "
                         "flat: this model is not restorer-conditioned; use flat_detail 1")


def student_sampling_for(model: MFSRTransformer, refine_t=None, jump=None, refine_side=None, detail=None,
                         flat_detail=None) -> StudentSampling | None:
    """The model's own grid and jumps with ``refine_t`` / ``jump`` / ``refine_side`` / ``detail`` / ``flat_detail``
    put in where given; None where none is."""
    given = _check_sampling(refine_t, jump, refine_side, detail, flat_detail)
    _check_detail(model, given.get("detail", 1.0), given.get("flat_detail", 1.0))
    return dataclasses.replace(StudentSampling.of(model.cfg), **given) if given else None


def upscale_array(arr: np.ndarray, *, scale: float = 4, steps: int = 1, model="default", device=None, dtype=None,
                  tile: int | None = None, seed: int = 0, progress=None, color_fix_method: str | None = None,
                  out_dtype=np.float32, refine_t: float | None = None, jump: str | None = None,
                  refine_side: str | None = None, detail: float | None = None,
                  flat_detail: float | None = None) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C in 1..4 (grey, grey + alpha, RGB, RGBA) -> the upscaled array, same C, in
    ``out_dtype``: float32 in [0, 1], or uint8 / uint16 (rounded), which is what bounds memory for large images:
    the output is filled row band by row band (``tiling.RowSink``), so peak memory is the model, one row of tiles
    and this array. ``refine_t`` / ``jump`` / ``refine_side`` replace the model's own multi-step grid and kind of jump,
    ``detail`` and ``flat_detail`` scale its texture (``upscale``)."""
    H, W, C = arr.shape
    if H < 1 or W < 1:
        raise ValueError(f"zero-size image ({W}x{H})")
    steps, scale = _check_steps_scale(steps, scale)
    _check_sampling(refine_t, jump, refine_side, detail, flat_detail)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"out_dtype must be float32, uint8 or uint16, got {out_dtype}")
    if color_fix_method not in (None, "wavelet", "adain"):
        raise ValueError(f"color_fix must be None, 'wavelet' or 'adain', got {color_fix_method!r}")
    arr = _checked_unit(arr, "image")
    m = load_model(model, device, dtype)
    sampling = student_sampling_for(m, refine_t, jump, refine_side, detail, flat_detail)
    dev = next(m.parameters()).device
    has_alpha = C in (2, 4)
    color = arr[..., : C - 1] if has_alpha else arr
    x = torch.from_numpy(np.ascontiguousarray(color)).permute(2, 0, 1)[None].to(dev)  # (1, 3 or 1, H, W)
    if x.shape[1] == 1:
        x = x.expand(1, 3, H, W)  # grey as RGB without a copy
    oh, ow = max(1, round(H * scale)), max(1, round(W * scale))
    try:
        out = np.empty((oh, ow, C), dtype=out_dtype)
    except MemoryError:
        raise MemoryError(f"not enough memory for the {ow}x{oh} output ({oh * ow * C * out_dtype.itemsize / 2**30:.1f}"
                          " GiB)") from None
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=None, desc="upscale", unit="tile", leave=False)

        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
    alpha = np.ascontiguousarray(arr[..., -1]) if has_alpha else None
    s = MODEL_SCALE
    tile = tile or auto_tile(m, dev)
    group = auto_tile_batch(m, dev, tile)
    while True:  # a CUDA out-of-memory error starts the image again with smaller tiles; rows are rewritten
        sink = RowSink(out, x, scale=s, color_fix=color_fix_method, grey=color.shape[2] == 1, alpha=alpha,
                       fix=color_fix, bicubic=_bicubic)
        try:
            gen = _rows(m, x, steps=steps, seed=seed, tile=tile, overlap=None, progress=progress or None,
                        teacher_guidance=None, tile_batch=group, restored=None, student_sampling=sampling)
            with torch.inference_mode():
                for r0, rows in gen:
                    rows = rows[:, :, : max(0, min(rows.shape[2], s * H - r0)), : s * W]  # drop the padding
                    if rows.shape[2]:
                        sink.push(r0, rows)
            break
        except torch.OutOfMemoryError as e:
            tile, group = _smaller(dev, tile, group, e)
    if bar is not None:
        bar.close()
    assert sink.done(), "internal error: output rows missing"
    return out


def upscale(image, *, scale: float = 4, steps: int = 1, model="default", device=None, dtype=None,
            tile: int | None = None, seed: int = 0, progress=None, color_fix: str | None = None,
            refine_t: float | None = None, jump: str | None = None, refine_side: str | None = None,
            detail: float | None = None, flat_detail: float | None = None):
    """Upscale ``image`` (path, PIL image, numpy array or torch tensor) by ``scale`` (the model's x4, then a
    high-quality resize for other factors) in ``steps`` MeanFlow steps (1 to 4 is the useful range).

    Returns a PIL image for path/PIL input (a uint16 numpy array for 16-bit files), otherwise the input's type.
    ``tile``: LR tile side in pixels (None: from free memory). ``progress``: True for a bar, or a callable
    (done, total). ``color_fix``: None, 'wavelet' or 'adain' (match colours to the LR). ``refine_t``, ``refine_side``
    and ``jump`` replace the model's own multi-step sampling (None: its config's): with ``refine_side`` 'below' the
    first jump goes from t = 1 to ``refine_t`` and the other steps - 1 are equal ones down to 0, with 'above' the
    steps - 1 equal ones go from 1 down to ``refine_t`` and one jump from there to 0 (``refine_t`` 0: a uniform grid);
    ``jump`` is 'average' (MeanFlow's) or 'endpoint' (every jump aims at the one-step estimate). They change steps 2
    and up only. ``detail`` in [0, 1] (None: 1) scales what a restorer-conditioned model adds to R(LR): the output is
    R(LR) + detail (model's output - R(LR)), computed before decoding; 1 is the model's own output, lower values
    trade its texture for R's smoothness (0.5 on faces, say). ``flat_detail`` in [0, 1] (None: the model's own,
    ``MFSRConfig.flat_detail``: 0.25 for the default model, 1 (off) for a model that stores none) does the same only
    where R(LR) is flat (``meanflow.flat_weight``): skies and walls lose their mottle, textured areas keep their
    detail (0.25 on DRealSR: a quarter less texture on the photos' flattest areas for 0.27 NIQE, where ``detail=0.5``
    costs 0.69 for less; benchmarks/RESULTS.md); 1 gives the model's raw output. Deterministic for a seed.
    """
    kw = dict(scale=scale, steps=steps, model=model, device=device, dtype=dtype, tile=tile, seed=seed,
              progress=progress, color_fix_method=color_fix, refine_t=refine_t, jump=jump, refine_side=refine_side,
              detail=detail, flat_detail=flat_detail)
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        arr, meta = read_image(image)
        res = upscale_array(arr, **kw, out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
        return res if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, Image.Image):
        arr, meta = pil_to_array(image)
        res = upscale_array(arr, **kw, out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
        return res if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, np.ndarray):
        arr, bits = _as_float(image)
        res = upscale_array(arr, **kw, out_dtype={8: np.uint8, 16: np.uint16}.get(bits, np.float32))
        if image.ndim == 2:
            res = res[..., 0]
        return res if bits else res.astype(image.dtype)
    if isinstance(image, torch.Tensor):
        t = image
        batched = t.dim() == 4
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 2, 3, 4) or not t.is_floating_point():
            raise ValueError("tensor image must be float (C, H, W) or (B, C, H, W) in [0, 1] with C in 1..4, got "
                             f"{tuple(image.shape)} {image.dtype}")
        frames = [_checked_unit(s.detach().permute(1, 2, 0).float().cpu().numpy(), "tensor image") for s in t]
        outs = [torch.from_numpy(upscale_array(f, **kw)).permute(2, 0, 1) for f in frames]
        out = torch.stack(outs).to(device=image.device, dtype=image.dtype)
        return out if batched else out[0]
    raise ValueError(f"image must be a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")


__all__ = ["upscale", "upscale_array", "upscale_rgb", "load_model", "attach_codec", "codec_of", "attach_restorer",
           "restorer_of", "lr_condition", "color_fix",
           "ImageError", "ImageMeta"]
