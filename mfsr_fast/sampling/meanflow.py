"""MeanFlow core (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), DESIGN sections 2-3.

Convention: z_t = (1 - t) x + t e, t = 1 is noise, v = e - x. The network predicts the average velocity
u(z_t, r, t) = 1 / (t - r) * int_r^t v(z_s, s) ds for r <= t.

- ``sample_t_r``: logit-normal t and r, sorted so r <= t, a fraction forced to r = t (``pair_t_r``: the pairing).
- ``meanflow_target``: u (differentiable) and u_tgt = v - (t - r) * du/dt (detached), with du/dt along the tangents
  (dz, dt, dr) = (v, 1, 0). Three modes: ``"explicit"`` calls ``fn(z, t, r, tangents=...)``, a model that computes
  its own tangent in the same pass (``MFSRTransformer.forward(..., tangents=...)``: no torch.func transform, so it
  works through DDP / FSDP wrappers and costs a fraction of the host time); ``"jvp"``: ONE ``torch.func.jvp`` whose
  primal output is back-propagated; ``"split"``: the JVP under no_grad and u from an ordinary forward.
- ``adaptive_loss``: per-sample squared error L, weighted by 1 / stopgrad((L + c) ** p).
- ``sample``: z_r = z_t - (t - r) * u(z_t, r, t) on a decreasing grid 1 = t_0 > ... > t_N = 0 (``jump="average"``),
  or z_r = z_t - (t - r) * u(z_t, 0, t) (``jump="endpoint"``: every jump aims at the one-step estimate from z_t).

Caution:
- ``fn`` must be a pure function of (z, t, r): no in-place updates of captured state (e.g. BatchNorm running stats),
  since the JVP traces it with functorch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch

UFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return s.reshape(s.shape[0], *([1] * (x.dim() - 1)))


def sample_t_r(batch: int, *, mean: float = -0.4, std: float = 1.0, equal_fraction: float = 0.75,
               generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r), each (batch,): t, r ~ sigmoid(N(mean, std)) sorted so r <= t; ``equal_fraction`` get r = t."""
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    a = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    b = torch.sigmoid(torch.randn(batch, generator=generator, device=device) * std + mean)
    equal = torch.rand(batch, generator=generator, device=device) < equal_fraction
    t, r = pair_t_r(a, b, equal)
    return t.to(dtype), r.to(dtype)


def pair_t_r(a: torch.Tensor, b: torch.Tensor, equal: torch.Tensor, one_step: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) from two time draws a, b (B,): t = max, r = min (so r <= t), r = t where ``equal`` (the flow-matching
    samples) and r = 0 where ``one_step`` (the one-step jump t -> 0). ``sample_t_r`` and distillation's per-sample
    draws (training/distill.py) both pair their draws here."""
    t = torch.maximum(a, b)
    r = torch.where(equal, t, torch.minimum(a, b))
    if one_step is not None:
        r = torch.where(one_step, torch.zeros_like(r), r)
    return t, r


def meanflow_target(fn: UFn, z_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, *,
                    mode: str = "jvp", jvp_fn: UFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (u, u_tgt): the prediction u = fn(z_t, t, r) and the detached MeanFlow target.

    MeanFlow eq. (8)-(10): u_tgt = v - (t - r) * du/dt, du/dt = v . d_z u + d_t u, from one JVP with tangents
    (v, 1, 0) for (z, t, r). With teacher distillation, v is the teacher's guided velocity (DESIGN section 3).

    mode "explicit": ``fn(z_t, t, r, tangents=(v, 1, 0))`` returns (u, du/dt) in one pass (``jvp_fn`` unused).
    mode "jvp": u is the JVP's primal output (one pass gives both; back-propagate through u).
    mode "split": the JVP runs under no_grad (on ``jvp_fn``, default ``fn``: pass the unwrapped module when ``fn``
    goes through DDP) and u comes from a separate ordinary call of ``fn``.
    """
    if mode not in ("explicit", "jvp", "split"):
        raise ValueError(f"mode must be 'explicit', 'jvp' or 'split', got {mode!r}")
    if v.shape != z_t.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal z_t shape {tuple(z_t.shape)}")
    v = v.detach()
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    if mode == "explicit":
        u, dudt = fn(z_t, t, r, tangents=tangents)
        dudt = dudt.detach()
    elif mode == "jvp":
        u, dudt = torch.func.jvp(fn, (z_t, t, r), tangents)
    else:
        with torch.no_grad():
            _, dudt = torch.func.jvp(jvp_fn or fn, (z_t, t, r), tangents)
        u = fn(z_t, t, r)
    # MeanFlow identity: u(z_t, r, t) = v(z_t, t) - (t - r) * du/dt.
    u_tgt = (v - _bcast(t - r, v).to(v.dtype) * dudt).detach()
    return u, u_tgt


def adaptive_loss(pred: torch.Tensor, target: torch.Tensor, *, p: float = 1.0, c: float = 1e-3,
                  reduce: bool = True) -> torch.Tensor:
    """MeanFlow adaptive weighting: L = sum of squared error per sample, loss = L / stopgrad((L + c) ** p).

    Returns the batch mean (``reduce``) or the per-sample losses (B,).
    """
    acc = torch.promote_types(pred.dtype, torch.float32)
    err = (pred.to(acc) - target.to(acc)).pow(2).flatten(1).sum(1)  # (B,)
    w = (err.detach() + c).pow(p)
    loss = err / w
    return loss.mean() if reduce else loss


REFINE_SIDES = ("below", "above")
JUMPS = ("average", "endpoint")


def check_refine_t(refine_t) -> None:
    """ValueError unless ``refine_t`` is a real number in [0, 1) (not a bool): the one rule for every grid."""
    if isinstance(refine_t, bool) or not isinstance(refine_t, numbers.Real) or not 0.0 <= refine_t < 1.0:
        raise ValueError(f"refine_t must be in [0, 1), got {refine_t!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """ValueError unless ``value`` is one of ``choices`` (``jump``, ``refine_side``)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def time_grid(steps: int, *, refine_t: float = 0.0, refine_side: str = "below", device=None,
              dtype=torch.float32) -> torch.Tensor:
    """Decreasing grid 1 = t_0 > t_1 > ... > t_N = 0 of N + 1 points: uniform, or with ``refine_t`` in (0, 1)
    - ``refine_side="below"``: a first jump to t_1 = refine_t, then N - 1 equal steps from there to 0;
    - ``refine_side="above"``: N - 1 equal steps from 1 down to t_{N-1} = refine_t, then one jump to 0. With endpoint
      jumps every step re-estimates the image from a noisier point with the same noise, the last from refine_t.
    For N = 1 both are [1, 0], for N = 2 both [1, refine_t, 0]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_refine_t(refine_t)
    check_choice("refine_side", refine_side, REFINE_SIDES)
    if refine_t == 0.0 or steps == 1:
        return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)
    if refine_side == "above":
        head = torch.linspace(1.0, refine_t, steps, device=device, dtype=dtype)
        return torch.cat([head, torch.zeros(1, device=device, dtype=dtype)])
    tail = torch.linspace(refine_t, 0.0, steps, device=device, dtype=dtype)
    return torch.cat([torch.ones(1, device=device, dtype=dtype), tail])


@torch.no_grad()
def sample(fn: UFn, noise: torch.Tensor, *, steps: int = 1, timesteps: Sequence[float] | torch.Tensor | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None, jump: str = "average") -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 in jumps t -> r along a decreasing grid.

    ``steps`` picks a uniform grid; ``timesteps`` gives any strictly decreasing grid from 1 to 0 instead.
    ``jump="average"`` (MeanFlow's own): z_r = z_t - (t - r) u(z_t, r, t), the average velocity over [r, t].
    ``jump="endpoint"``: z_r = z_t - (t - r) u(z_t, 0, t): each jump asks for the one-step estimate
    x = z_t - t u(z_t, 0, t) and moves to the point at r of the straight line from x through z_t, i.e.
    z_r = (r / t) z_t + (1 - r / t) x (a deterministic DDIM step on the one-step estimate). Both give the same
    one step x = e - u(e, 0, 1); they differ from 2 steps on, where the jumps that stop at r > 0 ask different
    questions of the student (docs/results/sampler.md).
    """
    check_choice("jump", jump, JUMPS)
    grid = time_grid(steps, device=noise.device) if timesteps is None else torch.as_tensor(
        timesteps, dtype=torch.float32, device=noise.device)
    if grid.dim() != 1 or grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("timesteps must be a strictly decreasing 1-D sequence of at least 2 points")
    if not (0.0 <= float(grid[-1]) and float(grid[0]) <= 1.0):
        raise ValueError("timesteps must lie in [0, 1]")
    z = noise
    B = noise.shape[0]
    tdtype = torch.promote_types(noise.dtype, torch.float32)
    for i in range(grid.numel() - 1):
        t = grid[i].to(tdtype).expand(B)
        r = grid[i + 1].to(tdtype).expand(B)
        u = fn(z, t, r if jump == "average" else torch.zeros_like(r))
        z = z - _bcast(t - r, z).to(z.dtype) * u
        if callback is not None:
            callback(i, z)
    return z
