"""(primal, tangent) pairs: the vocabulary of the model's explicit forward-mode pass.

MeanFlow's target needs du/dt of the network along (dz/dt, dt/dt, dr/dt) = (v, 1, 0) (DESIGN section 3). The model
computes it in the same call as u, layer by layer: every value travels as a ``Dual`` (primal, tangent), and each
operation below computes its primal exactly as a plain forward would and its tangent, the directional derivative,
beside it. A tangent of ``None`` means zero (nothing depends on the input tangents yet): such a value costs nothing
extra, and a call without tangents runs the primal ops alone.

Tangents are computed detached and without autograd (MeanFlow consumes them under stop-gradient); primals keep their
autograd graph, so u stays differentiable in reverse mode. tests/test_model_jvp.py checks the whole pass against
``torch.func.jvp`` in fp64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class Dual(NamedTuple):
    """A tensor and its tangent (None: zero)."""

    p: torch.Tensor
    t: torch.Tensor | None = None

    def map(self, f) -> Dual:
        """A linear op that only moves or selects entries (slice, reshape, transpose) applied to both."""
        return Dual(f(self.p), None if self.t is None else f(self.t))


def tangent_of(*ds: Dual | None) -> bool:
    """Whether any of ``ds`` carries a tangent."""
    return any(d is not None and d.t is not None for d in ds)


@torch.no_grad()
def sum_tangents(*ts: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of the tangents that are not None (left to right); None if all are."""
    ts = [t for t in ts if t is not None]
    return sum(ts[1:], ts[0]) if ts else None


def linear(lin: nn.Linear, x: Dual) -> Dual:
    """W x + b; tangent W tx (the bias has none)."""
    with torch.no_grad():
        t = None if x.t is None else F.linear(x.t, lin.weight)
    return Dual(lin(x.p), t)


def conv2d(conv: nn.Conv2d, x: Dual) -> Dual:
    """A convolution layer; tangent: the same convolution of tx without the bias."""
    with torch.no_grad():
        t = None if x.t is None else F.conv2d(x.t, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                              conv.groups)
    return Dual(conv(x.p), t)


def silu(x: Dual) -> Dual:
    """silu(x); tangent silu'(x) tx."""
    with torch.no_grad():
        t = None if x.t is None else torch.ops.aten.silu_backward(x.t, x.p.detach())
    return Dual(F.silu(x.p), t)


def gelu_tanh(x: Dual) -> Dual:
    """GELU with the tanh approximation; tangent gelu'(x) tx."""
    with torch.no_grad():
        t = None if x.t is None else torch.ops.aten.gelu_backward(x.t, x.p.detach(), approximate="tanh")
    return Dual(F.gelu(x.p, approximate="tanh"), t)


def add(a: Dual, b: Dual) -> Dual:
    return Dual(a.p + b.p, sum_tangents(a.t, b.t))


def scale(x: Dual, k: float) -> Dual:
    """k x for a constant k."""
    with torch.no_grad():
        t = None if x.t is None else k * x.t
    return Dual(k * x.p, t)


def gated(base: Dual, gate: Dual, h: Dual) -> Dual:
    """base + gate h, with gate (B, D) broadcast over the tokens of h (B, L, D) (adaLN-Zero's gated residual)."""
    with torch.no_grad():
        t = sum_tangents(base.t, None if gate.t is None else gate.t[:, None] * h.p.detach(),
                 None if h.t is None else gate.p.detach()[:, None] * h.t)
    return Dual(base.p + gate.p[:, None] * h.p, t)


def cat(xs: list[Dual], dim: int) -> Dual:
    """torch.cat of the primals and of the tangents (zeros stand in for None; None if every tangent is)."""
    p = torch.cat([x.p for x in xs], dim=dim) if len(xs) > 1 else xs[0].p
    if not tangent_of(*xs):
        return Dual(p)
    with torch.no_grad():
        ts = [torch.zeros_like(x.p) if x.t is None else x.t for x in xs]
        return Dual(p, torch.cat(ts, dim=dim) if len(ts) > 1 else ts[0])


def chunk(x: Dual, n: int) -> list[Dual]:
    """x.chunk(n, dim=1) for both."""
    ps = x.p.chunk(n, dim=1)
    ts = x.t.chunk(n, dim=1) if x.t is not None else (None,) * n
    return [Dual(p, t) for p, t in zip(ps, ts)]


def rms_norm(norm, x: Dual) -> Dual:
    """An ``RMSNorm`` module (or None: identity) and its tangent."""
    return x if norm is None else Dual(norm(x.p), norm.tangent(x.p, x.t))


def modulate(x: Dual, shift: Dual, scale: Dual, *, gate: Dual | None = None, h: Dual | None = None,
             eps: float = 1e-6, backend: str = "auto"):
    """``kernels.adaln_modulate`` on pairs: y = LN(x) (1 + scale) + shift, or with ``h`` first x' = x + gate h and
    (x', y) from it. Fused with its tangent (``kernels.adaln_modulate_with_tangent``) when any input has one."""
    g, hp = (None if gate is None else gate.p), (None if h is None else h.p)
    if not tangent_of(x, shift, scale, gate, h):
        out = kernels.adaln_modulate(x.p, shift.p, scale.p, gate=g, h=hp, eps=eps, backend=backend)
        return Dual(out) if h is None else (Dual(out[0]), Dual(out[1]))
    out, t = kernels.adaln_modulate_with_tangent(
        x.p, shift.p, scale.p, gate=g, h=hp, tx=x.t, tshift=shift.t, tscale=scale.t,
        tgate=None if gate is None else gate.t, th=None if h is None else h.t, eps=eps, backend=backend)
    return Dual(out, t) if h is None else (Dual(out[0], t[0]), Dual(out[1], t[1]))


def attention(q: Dual, k: Dual, v: Dual, backend: str = "auto") -> Dual:
    """``kernels.attention`` on (B, H, L, Dh) pairs; its tangent from the fused flash-attention tangent pass."""
    if not tangent_of(q, k, v):
        return Dual(kernels.attention(q.p, k.p, v.p, backend=backend))
    return Dual(*kernels.attention_with_tangent(q.p, k.p, v.p, q.t, k.t, v.t, backend=backend))


__all__ = ["Dual", "tangent_of", "sum_tangents", "linear", "conv2d", "silu", "gelu_tanh", "add", "scale", "gated",
           "cat", "chunk", "rms_norm", "modulate", "attention"]
