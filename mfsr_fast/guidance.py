"""Sampling a teacher (a flow-matching model with learned prompts): classifier-free guided velocity and Euler
integration. Used by evaluation, by ``upscale(..., teacher_guidance=w)`` and by the distillation target."""

from __future__ import annotations

import torch

from mfsr_fast.meanflow import time_grid
from mfsr_fast.model import PROMPT_NAMES, MFSRTransformer


@torch.no_grad()
def guided_velocity(model: MFSRTransformer, z: torch.Tensor, c: torch.Tensor, t: torch.Tensor, w: float,
                    against: str = "negative") -> torch.Tensor:
    """v_against + w (v_positive - v_against): one batched pass over both prompts (w = 1: no guidance)."""
    B = z.shape[0]
    if w == 1.0:
        ctx, pooled = model.prompt("positive", B)
        return model.field(z, c, t, t, ctx, pooled)
    idx = torch.tensor([PROMPT_NAMES.index(against)] * B + [PROMPT_NAMES.index("positive")] * B, device=z.device)
    ctx, pooled = model.prompt(idx)
    tt = t.repeat(2)
    v_neg, v_pos = model.field(z.repeat(2, 1, 1, 1), c.repeat(2, 1, 1, 1), tt, tt, ctx, pooled).chunk(2)
    return v_neg + w * (v_pos - v_neg)


@torch.no_grad()
def sample_teacher(model: MFSRTransformer, c: torch.Tensor, noise: torch.Tensor, *, steps: int = 40,
                   guidance: float = 1.0, against: str = "negative") -> torch.Tensor:
    """N Euler steps of the guided velocity from t = 1 to 0 (NFE = steps, or 2 x steps with guidance)."""
    grid = time_grid(steps, device=noise.device)
    z = noise
    for i in range(steps):
        t = grid[i].expand(z.shape[0])
        z = z - (grid[i] - grid[i + 1]) * guided_velocity(model, z, c, t, guidance, against)
    return z


