"""Pieces shared by the Triton kernels: the interpreter flag, the log-base constants, each program's block of a
(batch x head) problem, and the rounding store cast."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd import forward_ad

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

# Read once, as Triton does when it decorates the kernels at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Softmax in base 2 (exp2 and log2 are the hardware's): scores are scaled by log2(e), a natural-log LSE is stored as
# its base-2 value times ln(2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# Tests set this to fill every output with NaN before launch, so an element a kernel fails to write shows up.
POISON = False


def new_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device (its shape and dtype unless given); all NaN under POISON."""
    out = torch.empty(like.shape if shape is None else shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON else out


@triton.jit
def program_block(H, L, BLOCK: tl.constexpr, OTHER: tl.constexpr, D: tl.constexpr):
    """This program's share of a grid (cdiv(L, BLOCK), B * H): its (batch x head) index i_bh, the batch and head
    indices (int64, for strides), the offsets of its block of BLOCK rows along L and their mask, the offsets of a
    block of OTHER rows of the other sequence (the loop's), and those of the head dimension."""
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_blk = i_blk * BLOCK + tl.arange(0, BLOCK)
    return i_bh, i_b, i_h, o_blk, o_blk < L, tl.arange(0, OTHER), tl.arange(0, D)


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


def signature(kernel, act: str, fp32_ptrs=(), floats=("scale", "eps")) -> dict[str, str]:
    """A Triton kernel's ahead-of-time signature, read from its own parameter list (no hand-kept copy): ``*_ptr``
    parameters point to the activation dtype ``act`` ("bf16", "fp16", "fp32") unless named in ``fp32_ptrs``,
    ``floats`` are fp32 scalars, every other runtime parameter is i32; constexprs are the caller's."""
    return {p.name: ((f"*{act}" if p.name not in fp32_ptrs else "*fp32") if p.name.endswith("_ptr")
                     else "fp32" if p.name in floats else "i32")
            for p in kernel.params if not p.is_constexpr}


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
