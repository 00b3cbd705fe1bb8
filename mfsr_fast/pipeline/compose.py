"""What the pipeline does to a model's decoded output: composition with R(LR) where R(LR) is flat (``flat_weight``,
``compose_flat``) and colour correction against the LR image (``color_fix``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mfsr_fast.pipeline.texture import local_texture, luma

COLOR_FIXES = ("wavelet", "adain")
# RMS local texture of R(LR)'s Y (0-255 levels; texture.local_texture, 17 px windows) at or below which
# ``flat_detail`` applies in full, and at or above which not at all (how they were picked: docs/results/texture.md).
FLAT_TEXTURE = (1.5, 4.0)


def flat_weight(restored: torch.Tensor, flat_detail: float) -> torch.Tensor:
    """(B, 3, H, W) R(LR) in [0, 1] -> (B, 1, H, W): the share of a model's texture over it that ``flat_detail`` keeps,
    ``flat_detail`` where R's RMS local texture (Y, 0-255 levels) is at most FLAT_TEXTURE[0], rising linearly to 1 at
    FLAT_TEXTURE[1]."""
    lo, hi = FLAT_TEXTURE
    s = ((local_texture(luma(restored.float())).sqrt() - lo) / (hi - lo)).clamp(0, 1)
    return flat_detail + (1 - flat_detail) * s


def compose_flat(restored: torch.Tensor, out: torch.Tensor, flat_detail: float) -> torch.Tensor:
    """R(LR) + w (out - R(LR)) with w = ``flat_weight(R(LR), flat_detail)``: the model's texture over R(LR) scaled
    down where R(LR) is flat, in pixels, clamped to [0, 1]."""
    base = restored.to(out)
    return (base + flat_weight(base, flat_detail) * (out - base)).clamp(0, 1)


def check_color_fix(method) -> None:
    if method not in (None, *COLOR_FIXES):
        raise ValueError(f"color_fix must be None, 'wavelet' or 'adain', got {method!r}")


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
