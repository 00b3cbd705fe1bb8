"""Pure-PyTorch ground truth for every kernel in this package.

Tests, benchmarks and the CPU path import these functions; nothing else keeps a copy of the math.

- ``attention``: non-causal softmax attention over (B, H, L, D) tensors, as ``F.scaled_dot_product_attention``.
  Without forward-mode AD it calls SDPA (whose fused CPU/CUDA kernels never build the L x L score matrix). Under
  forward-mode AD (``torch.func.jvp`` or ``torch.autograd.forward_ad``), where SDPA's fused kernels raise, it runs
  plain math chunked over queries so that scores and their tangents exist for one chunk at a time.
- ``adaln_modulate``: LayerNorm without affine, then adaLN modulation, optionally preceded by a gated residual:
  x' = x + gate * h; y = LN(x') * (1 + scale) + shift. Statistics in fp32, output in the activation dtype.

Supported dtypes: fp64, fp32, bf16, fp16.

Caution:
- Under forward-mode AD *and* reverse mode at once, autograd keeps every query chunk's probabilities for the backward
  pass, so memory is O(L^2) in that case (tiny CPU presets only; the Triton kernel is the O(L) path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk's score block (and of each tangent block) under forward-mode AD: ~32 MB in fp32.
_CHUNK_ELEMENTS = 1 << 23


def _needs_forward_ad(*tensors: torch.Tensor) -> bool:
    """True when any tensor carries a forward-mode tangent (functorch wrapper or dual tensor)."""
    for x in tensors:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return True
        if torch.autograd.forward_ad.unpack_dual(x).tangent is not None:
            return True
    return False


def _softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in fp32 for half-precision scores."""
    if s.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(s.float(), dim=-1).to(s.dtype)
    return torch.softmax(s, dim=-1)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v computed chunk by chunk over queries; every op has forward and reverse AD."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * Lk))
    if chunk >= Lq:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
        return torch.matmul(_softmax(s), v)  # (B, H, Lq, D)
    outs = []
    for i in range(0, Lq, chunk):
        s = torch.matmul(q[:, :, i:i + chunk], k.transpose(-1, -2)) * scale  # (B, H, c, Lk)
        outs.append(torch.matmul(_softmax(s), v))  # (B, H, c, D)
    return torch.cat(outs, dim=2)  # (B, H, Lq, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference non-causal attention, (B, H, L, D) in and out, with bounded memory in every AD mode."""
    if _needs_forward_ad(q, k, v):
        return attention_math(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Output and log-sum-exp of the scores (natural log), (B, H, L) in fp32 (fp64 for fp64 input): what a flash
    kernel saves for its backward pass. Materialises the scores: for tests and small shapes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    o = torch.matmul(torch.exp(s - lse[..., None]), v.to(acc))  # (B, H, Lq, D)
    return o.to(q.dtype), lse


def mod_rows(m: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A per-sample modulation (B, D) or (B, 1, D) -> (B, D), checked against x (B, L, D)."""
    if m.dim() == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 2 or m.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"adaln_modulate: {name} must have shape (B, D) or (B, 1, D) = ({x.shape[0]}, "
                         f"{x.shape[2]}), got {tuple(m.shape)}")
    return m


def check_adaln_args(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None,
                     h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``adaln_modulate``'s argument checks, for the reference and the Triton path alike: x (B, L, D); shift, scale
    and gate (B, D) or (B, 1, D), returned as (B, D); gate and h together, h shaped like x."""
    if x.dim() != 3:
        raise ValueError(f"adaln_modulate: x must be (B, L, D), got shape {tuple(x.shape)}")
    if (gate is None) != (h is None):
        raise ValueError("adaln_modulate: gate and h come together (gated residual x + gate * h)")
    if h is not None and h.shape != x.shape:
        raise ValueError(f"adaln_modulate: h must match x {tuple(x.shape)}, got {tuple(h.shape)}")
    return (mod_rows(shift, x, "shift"), mod_rows(scale, x, "scale"),
            None if gate is None else mod_rows(gate, x, "gate"))


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None = None,
                   h: torch.Tensor | None = None, eps: float = 1e-6):
    """y = LN(x) * (1 + scale) + shift, or with ``h``: x' = x + gate * h and returns (x', LN(x') * (1 + scale) + shift).

    x, h: (B, L, D); shift, scale, gate: (B, D) or (B, 1, D). LayerNorm statistics are computed in fp32 (fp64 for fp64
    input); the outputs have x's dtype.
    """
    shift, scale, gate = (None if m is None else m[:, None, :] for m in check_adaln_args(x, shift, scale, gate, h))
    if h is not None:
        x = x + gate.to(x.dtype) * h  # (B, L, D)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = F.layer_norm(x.to(stat_dtype), (x.shape[-1],), eps=eps)  # (B, L, D)
    y = (xn * (1 + scale.to(stat_dtype)) + shift.to(stat_dtype)).to(x.dtype)  # (B, L, D)
    return y if h is None else (x, y)


def attention_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                      tk: torch.Tensor | None, tv: torch.Tensor | None, scale: float | None = None,
                      chunk: int | None = None) -> torch.Tensor:
    """Forward-mode tangent tO of attention for input tangents (None = zero), chunked over queries (memory bounded in
    L), no autograd: tS = (tQ K^T + Q tK^T) * scale; tO = (P * tS) V + P tV - rowsum(P * tS) * O. Half-precision inputs
    are computed in fp32; the result has q's dtype."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * Lk))
    with torch.no_grad():
        k_, v_ = k.detach().to(acc), v.detach().to(acc)
        tk_ = tk.detach().to(acc) if tk is not None else None
        tv_ = tv.detach().to(acc) if tv is not None else None
        outs = []
        for i in range(0, Lq, chunk):
            q_ = q.detach()[:, :, i:i + chunk].to(acc)
            p = torch.softmax(torch.matmul(q_, k_.transpose(-1, -2)) * scale, dim=-1)  # (B, H, c, Lk)
            to = torch.zeros(q_.shape, dtype=acc, device=q.device)
            if tq is not None or tk_ is not None:
                ts = torch.zeros(p.shape, dtype=acc, device=q.device)
                if tq is not None:
                    ts += torch.matmul(tq.detach()[:, :, i:i + chunk].to(acc), k_.transpose(-1, -2))
                if tk_ is not None:
                    ts += torch.matmul(q_, tk_.transpose(-1, -2))
                pts = p * ts * scale
                to += torch.matmul(pts, v_) - pts.sum(-1, keepdim=True) * torch.matmul(p, v_)
            if tv_ is not None:
                to += torch.matmul(p, tv_)
            outs.append(to)
        return torch.cat(outs, dim=2).to(q.dtype)  # (B, H, Lq, D)


def adaln_tangent(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None = None,
                  h: torch.Tensor | None = None, tx: torch.Tensor | None = None, tshift: torch.Tensor | None = None,
                  tscale: torch.Tensor | None = None, tgate: torch.Tensor | None = None, th: torch.Tensor | None = None,
                  eps: float = 1e-6):
    """Forward-mode tangents of ``adaln_modulate`` for input tangents (None = zero), no autograd: ty, or (tx', ty)
    with ``h``. x' = x + gate * h gives tx' = tx + tgate * h + gate * th; with xn = (x' - mean) * rstd,
    txn = rstd * (u - xn * mean(xn * u)) for u = tx' - mean(tx'), and ty = txn * (1 + scale) + xn * tscale + tshift.
    Statistics in fp32 (fp64 for fp64 input), outputs in x's dtype."""
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x = x.detach()
        shift = mod_rows(shift.detach(), x, "shift")[:, None, :]
        scale = mod_rows(scale.detach(), x, "scale")[:, None, :].to(stat)
        rows = lambda m, name: None if m is None else mod_rows(m.detach(), x, name)[:, None, :].to(stat)  # noqa: E731
        tshift, tscale, tgate = rows(tshift, "tshift"), rows(tscale, "tscale"), rows(tgate, "tgate")
        txr = tx.detach().to(stat) if tx is not None else None
        if h is not None:
            gate = mod_rows(gate.detach(), x, "gate")[:, None, :]
            x = x + gate.to(x.dtype) * h.detach()
            parts = [txr] if txr is not None else []
            if tgate is not None:
                parts.append(tgate * h.detach().to(stat))
            if th is not None:
                parts.append(gate.to(stat) * th.detach().to(stat))
            txr = sum(parts) if parts else None
        xs = x.to(stat)
        mean = xs.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xs - mean).pow(2).mean(-1, keepdim=True) + eps)
        xn = (xs - mean) * rstd
        ty = torch.zeros_like(xs)
        if txr is not None:
            u = txr - txr.mean(-1, keepdim=True)
            ty += rstd * (u - xn * (xn * u).mean(-1, keepdim=True)) * (1 + scale)
        if tscale is not None:
            ty += xn * tscale
        if tshift is not None:
            ty += tshift
        ty = ty.to(x.dtype)
        if h is None:
            return ty
        return (txr.to(x.dtype) if txr is not None else torch.zeros_like(x)), ty
