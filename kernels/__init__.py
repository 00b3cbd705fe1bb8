"""Public kernel entry points. The model calls only these two functions.

``backend``: "auto" runs the Triton kernel on CUDA tensors when Triton is importable and the reference otherwise;
"triton" forces the kernel (also on the CPU under ``TRITON_INTERPRET=1``); "reference" forces ``kernels.reference``.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels import reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None
if _HAS_TRITON:
    from kernels import adaln, flash, tiles  # the Triton kernels and their launch configurations
else:
    adaln = flash = tiles = None

__all__ = ["attention", "adaln_modulate", "attention_with_tangent", "adaln_modulate_with_tangent", "reference", "flash",
           "adaln", "tiles", "triton_available"]

_BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    return _HAS_TRITON


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return x.is_cuda and _HAS_TRITON
    if backend == "triton" and not _HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    return backend == "triton"


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _use_triton_attention(backend: str, q: torch.Tensor) -> bool:
    use = _use_triton(backend, q)
    if use and backend == "auto" and (q.shape[-1] not in flash.HEAD_DIMS or q.dtype == torch.float64
                                      or (q.dtype == torch.float32 and q.shape[-1] not in tiles.GPU_FP32_HEAD_DIMS)):
        use = False  # what the kernel does not take stays on the reference under 'auto'
    return use


def _use_triton_adaln(backend: str, x: torch.Tensor) -> bool:
    use = _use_triton(backend, x)
    if use and backend == "auto" and (x.shape[-1] > adaln.MAX_D or x.dtype == torch.float64):
        use = False  # one row lives in registers in the kernel; wider rows and fp64 stay on the reference
    return use


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Non-causal joint attention, q, k, v and output laid out (B, H, L, D) as in SDPA; scale defaults to D**-0.5.

    Differentiable in reverse mode and in forward mode (``torch.func.jvp``), with memory bounded in L.
    """
    _check_shapes(q, k, v)
    if _use_triton_attention(backend, q):
        return flash.attention(q, k, v, scale)
    return reference.attention(q, k, v, scale)


def attention_with_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                           tk: torch.Tensor | None, tv: torch.Tensor | None, *, scale: float | None = None,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO): ``attention(q, k, v)`` (differentiable in reverse mode) and its forward-mode tangent for the input
    tangents (None = zero), detached. A model's explicit tangent pass calls this instead of running under
    ``torch.func.jvp``; the kernel path is the forward kernel plus the tangent pass on its saved log-sum-exp."""
    _check_shapes(q, k, v)
    for name, t, x in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"attention: tangent {name} must match its input {tuple(x.shape)}, got {tuple(t.shape)}")
    if _use_triton_attention(backend, q):
        return flash.attention_with_tangent(q, k, v, tq, tk, tv, scale)
    o = reference.attention(q, k, v, scale)
    return o, reference.attention_tangent(q, k, v, tq, tk, tv, scale)


def adaln_modulate_with_tangent(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *,
                                gate: torch.Tensor | None = None, h: torch.Tensor | None = None,
                                tx: torch.Tensor | None = None, tshift: torch.Tensor | None = None,
                                tscale: torch.Tensor | None = None, tgate: torch.Tensor | None = None,
                                th: torch.Tensor | None = None, eps: float = 1e-6, backend: str = "auto"):
    """``adaln_modulate``'s outputs (differentiable in reverse mode) and their forward-mode tangents for the input
    tangents (None = zero), detached: (y, ty), or ((x', y), (tx', ty)) with ``h``."""
    if _use_triton_adaln(backend, x):
        return adaln.adaln_modulate_with_tangent(x, shift, scale, gate, h, tx, tshift, tscale, tgate, th, eps)
    out = reference.adaln_modulate(x, shift, scale, gate=gate, h=h, eps=eps)
    return out, reference.adaln_tangent(x, shift, scale, gate, h, tx, tshift, tscale, tgate, th, eps)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, gate: torch.Tensor | None = None,
                   h: torch.Tensor | None = None, eps: float = 1e-6, backend: str = "auto"):
    """y = LN(x) * (1 + scale) + shift; with ``gate`` and ``h`` returns (x + gate * h, y of that sum).

    x, h: (B, L, D); shift, scale, gate: (B, D) or (B, 1, D).
    """
    if _use_triton_adaln(backend, x):
        return adaln.adaln_modulate(x, shift, scale, gate=gate, h=h, eps=eps)
    return reference.adaln_modulate(x, shift, scale, gate=gate, h=h, eps=eps)
