"""Sampling a teacher (a flow-matching model with learned prompts): classifier-free guided velocity and Euler
integration, as ``TeacherSampling`` (``sampling.config``) says. Used by evaluation, by a pipeline whose sampler is a
``TeacherSampling`` and by the distillation target.
"""

from __future__ import annotations

import torch

from mfsr_fast.models.transformer import PROMPT_NAMES, MFSRTransformer
from mfsr_fast.sampling.config import TeacherSampling


@torch.no_grad()
def guided_velocity(model: MFSRTransformer, z: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                    w: float | torch.Tensor, against: str = "negative") -> torch.Tensor:
    """v_against + w (v_positive - v_against): one batched pass over both prompts (w = 1: no guidance, one pass).
    ``w`` is one weight or one per sample (shape (B,), as ``TeacherSampling.weights`` gives); with per-sample
    weights the ``against`` prompt runs on the guided samples only (one pass of B + G rows, G of them guided), and
    an unguided sample gets v_positive itself."""
    B = z.shape[0]
    if isinstance(w, torch.Tensor):
        if w.shape != (B,):
            raise ValueError(f"per-sample guidance weights need shape ({B},), got {tuple(w.shape)}")
        guided = (w != 1.0).nonzero().flatten().to(z.device)
        if guided.numel() == 0:
            w = 1.0
        else:  # all guided too: then B + G = 2B rows, as a scalar weight's pass
            ctx, pooled = model.prompt(torch.tensor([PROMPT_NAMES.index("positive")] * B
                                                    + [PROMPT_NAMES.index(against)] * guided.numel(), device=z.device))
            tt = torch.cat([t, t[guided]])
            v = model.field(torch.cat([z, z[guided]]), torch.cat([c, c[guided]]), tt, tt, ctx, pooled)
            v_pos, v_neg = v[:B], v[B:]
            wg = w.to(device=z.device, dtype=z.dtype)[guided].view(-1, *([1] * (z.dim() - 1)))
            return v_pos.index_copy(0, guided, v_neg + wg * (v_pos[guided] - v_neg))
    if w == 1.0:  # a scalar from here on
        ctx, pooled = model.prompt("positive", B)
        return model.field(z, c, t, t, ctx, pooled)
    idx = torch.tensor([PROMPT_NAMES.index(against)] * B + [PROMPT_NAMES.index("positive")] * B, device=z.device)
    ctx, pooled = model.prompt(idx)
    tt = t.repeat(2)
    v_neg, v_pos = model.field(z.repeat(2, 1, 1, 1), c.repeat(2, 1, 1, 1), tt, tt, ctx, pooled).chunk(2)
    return v_neg + w * (v_pos - v_neg)


@torch.no_grad()
def sample_teacher(model: MFSRTransformer, c: torch.Tensor, noise: torch.Tensor, *, steps: int = 40,
                   guidance: float | TeacherSampling = 1.0, against: str = "negative") -> torch.Tensor:
    """``steps`` Euler steps of the guided velocity from t = 1 to 0 (NFE: ``TeacherSampling.nfe``). ``guidance`` is
    a weight w (every step guided against ``against``, uniform grid) or a ``TeacherSampling``."""
    how = guidance if isinstance(guidance, TeacherSampling) else TeacherSampling(guidance=guidance, against=against)
    grid = how.grid(steps, device=noise.device)
    z = noise
    for i in range(steps):
        t = grid[i].expand(z.shape[0])
        z = z - (grid[i] - grid[i + 1]) * guided_velocity(model, z, c, t, how.weight(float(grid[i])), how.against)
    return z
