"""Sampling a teacher (a flow-matching model with learned prompts): classifier-free guided velocity and Euler
integration. Used by evaluation, by ``upscale(..., teacher_guidance=...)`` and by the distillation target.

``TeacherSampling`` says how: the guidance weight w, the prompt it pushes away from, the time grid (``refine_t``:
a first Euler step from t = 1 straight to ``refine_t``, then equal steps to 0, the students' multi-step grid) and
the guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
distribution quality in diffusion models"): w applies at the steps whose t lies in (lo, hi], the other steps take
the positive prompt's velocity alone (one pass instead of two). Why the small presets need both (their plain 40
guided steps diverge): benchmarks/RESULTS.md, "The teacher's 40 steps made to gain".
"""

from __future__ import annotations

import dataclasses

import torch

from mfsr_fast.meanflow import check_share, time_grid
from mfsr_fast.model import PROMPT_NAMES, MFSRTransformer


@dataclasses.dataclass(frozen=True)
class TeacherSampling:
    """How a teacher is sampled: Euler steps of v_against + w (v_positive - v_against) where t is in ``interval``
    (lo, hi], of v_positive elsewhere, on ``time_grid(steps, refine_t=refine_t)``. The defaults are the plain form:
    guidance at every step of a uniform grid."""

    guidance: float = 1.0
    against: str = "negative"
    refine_t: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    # The output composed with R(LR) where R(LR) is flat, as a student's (``meanflow.StudentSampling.flat_detail``),
    # so that a teacher's samples and a student's steps can be compared as a user gets them; 1: off.
    flat_detail: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.guidance, (int, float)) and self.guidance == self.guidance and self.guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, got {self.guidance!r}")
        if self.against not in ("negative", "null"):
            raise ValueError(f"against must be 'negative' or 'null', got {self.against!r}")
        if not 0.0 <= self.refine_t < 1.0:
            raise ValueError(f"refine_t must be in [0, 1), got {self.refine_t}")
        lo, hi = self.interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"the guidance interval (lo, hi] needs 0 <= lo < hi <= 1, got ({lo}, {hi}]")
        check_share("flat_detail", self.flat_detail)

    def weight(self, t: float) -> float:
        """w at a step that starts at time t (1.0 outside the interval). Grid times are float32: a t within 1e-6 of
        an end counts as that end, so 'above 0.3' means the same on every grid."""
        lo, hi = self.interval
        return float(self.guidance) if lo + 1e-6 < t <= hi + 1e-6 else 1.0

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``weight`` for each sample of a batch of times (the distillation target's per-sample w)."""
        lo, hi = self.interval
        inside = (t > lo + 1e-6) & (t <= hi + 1e-6)
        return torch.where(inside, torch.full_like(t, float(self.guidance)), torch.ones_like(t))

    def grid(self, steps: int, device=None) -> torch.Tensor:
        return time_grid(steps, refine_t=self.refine_t, device=device)

    def nfe(self, steps: int) -> int:
        """Network passes for ``steps`` Euler steps: two at a guided step, one elsewhere."""
        return sum(2 if self.weight(float(t)) != 1.0 else 1 for t in self.grid(steps)[:-1])


def as_sampling(spec: float | TeacherSampling) -> TeacherSampling:
    """A guidance weight w (guidance at every step of a uniform grid, the plain form) or a ``TeacherSampling``."""
    if isinstance(spec, TeacherSampling):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise TypeError(f"teacher_guidance must be a number or a TeacherSampling, got {type(spec).__name__}")
    return TeacherSampling(guidance=float(spec))


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
