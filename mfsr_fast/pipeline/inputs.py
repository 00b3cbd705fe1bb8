"""The checks every way into the pipeline shares (library, command line, web page): the call's numbers and the
pixels' range, each in one place, with a sentence that says what is wrong."""

from __future__ import annotations

import numbers

import numpy as np

from mfsr_fast.io.images import checked_unit

__all__ = ["OUT_DTYPES", "as_float", "check_out_dtype", "check_run", "check_steps_scale", "checked_unit"]

OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.uint16))


def check_steps_scale(steps, scale) -> tuple[int, float]:
    """steps: an integer in 1..64 (numpy integers too, not bool); scale: a real number in (0, 16] (not bool)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 64:
        raise ValueError(f"steps must be an integer in 1..64, got {steps!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    return int(steps), float(scale)


MIN_TILE = 8


def check_run(tile, seed, progress) -> None:
    """tile: None (from free memory) or an integer of at least MIN_TILE LR pixels (a model whose patches span
    several pixels raises it to 8 patches); seed: an integer in the 64-bit range (numpy integers too, not bool);
    progress: None, a bool or a callable (done, total)."""
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < MIN_TILE):
        raise ValueError(f"tile must be None (from free memory) or an integer of at least {MIN_TILE} LR pixels, "
                         f"got {tile!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an integer (64-bit), got {seed!r}")
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise ValueError(f"progress must be None, True / False or a callable (done, total), got "
                         f"{type(progress).__name__}")


def check_out_dtype(out_dtype) -> np.dtype:
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, uint8 or uint16, got {out_dtype}")
    return out_dtype


def as_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """numpy image -> (H, W, C) float32 in [0, 1] and its bit depth (8, 16, or 0 for float input)."""
    if arr.size == 0:
        raise ValueError(f"numpy image is empty (shape {arr.shape})")
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
