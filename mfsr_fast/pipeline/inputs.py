"""The checks every way into the pipeline shares (library, command line, web page): the call's numbers and the
pixels' range, each in one place, with a sentence that says what is wrong."""

from __future__ import annotations

import numbers
import warnings

import numpy as np

OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.uint16))


def check_steps_scale(steps, scale) -> tuple[int, float]:
    """steps: an integer in 1..64 (numpy integers too, not bool); scale: a real number in (0, 16] (not bool)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 64:
        raise ValueError(f"steps must be an integer in 1..64, got {steps!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    return int(steps), float(scale)


def check_out_dtype(out_dtype) -> np.dtype:
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, uint8 or uint16, got {out_dtype}")
    return out_dtype


def checked_unit(arr: np.ndarray, what: str) -> np.ndarray:
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


def as_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
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
        return checked_unit(arr.astype(np.float32), "numpy image"), 0
    raise ValueError(f"numpy image dtype must be uint8, uint16 or float, got {arr.dtype}")
