"""What a model's LR stream sees (DESIGN sections 4 and 8): the LR image upsampled x4 by bicubic interpolation, the
restorer's output R(LR), or both, encoded by the model's codec. Training, sampling and upscaling all build it here,
so that a model sees at inference exactly what it saw in training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 4  # every model here upscales x4: its LR stream sees the LR image at 4 times its size


def bicubic(x: torch.Tensor, size) -> torch.Tensor:
    """(B, C, h, w) in [0, 1] -> (B, C, *size), antialiased bicubic, clamped to [0, 1]."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def lr_condition(model, codec, lr: torch.Tensor, restored: torch.Tensor | None = None) -> torch.Tensor:
    """The LR stream's input for LR images (B, 3, h, w) in [0, 1], encoded by ``codec``: the bicubic upsampling x4,
    R(LR) (``restored``, (B, 3, 4h, 4w) in [0, 1]) or both concatenated, as the model's ``lr_source`` says."""
    source = model.cfg.lr_source
    size = (SCALE * lr.shape[-2], SCALE * lr.shape[-1])
    if source == "bicubic":
        return codec.encode(bicubic(lr, size))
    if restored is None or restored.shape[-2:] != size:
        raise ValueError(f"lr_source {source!r} needs R(LR) at x{SCALE} the LR size")
    c = codec.encode(restored)
    if source == "restorer":
        return c
    return torch.cat([c, codec.encode(bicubic(lr, restored.shape[-2:]))], dim=1)
