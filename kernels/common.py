"""Pieces shared by the Triton kernels: the interpreter flag and the rounding store cast."""

from __future__ import annotations

import os

import triton
import triton.language as tl

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
