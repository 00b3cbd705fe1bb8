"""Pieces shared by the Triton kernels: the interpreter flag and the rounding store cast."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd import forward_ad

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

# Read once, as Triton does when it decorates the kernels at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def cast_out(b_x, ptr, RTNE: tl.constexpr):
    """fp32 block -> ptr's element type. With RTNE (the interpreter, whose fp32 -> bf16 casts truncate even with
    fp_downcast_rounding="rtne"), round to nearest even by hand first, as a GPU's cvt.rn does."""
    if RTNE:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = b_x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            b_x = bits.to(tl.float32, bitcast=True)
    return b_x.to(ptr.dtype.element_ty)


def needs_autograd(*tensors) -> bool:
    """Whether a call must go through the autograd.Function: gradients are being recorded for an input, forward-mode
    AD is active, or an input is wrapped by a torch.func transform. Otherwise (inference) the launcher is called
    directly, which saves the Function's Python overhead (tens of microseconds a call)."""
    if forward_ad._current_level >= 0:
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((grad and t.requires_grad) or _is_wrapped(t)):
            return True
    return False


def any_wrapped(*tensors) -> bool:
    """Whether a torch.func transform wraps any input (a Function's jvp rule receives such tensors): those must go
    through the registered custom op, which unwraps them, and never reach Triton directly."""
    return any(t is not None and _is_wrapped(t) for t in tensors)
