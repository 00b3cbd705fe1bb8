"""Flash attention with a forward-mode tangent (JVP) for MeanFlow training and one-step inference.

    S = Q K^T * scale,  P = softmax(S),  O = P V                       (non-causal, joint attention)
    tS = (tQ K^T + Q tK^T) * scale,  tO = (P * tS) V + P tV - rowsum(P * tS) * O

q, k, v: (B, H, L, D) as in SDPA, D in {32, 64, 128}, any Lq and Lk (ragged tails masked), fp32 / bf16 / fp16,
softmax statistics in fp32; q, k, v may be strided (any strides with a unit last stride are indexed directly).

Kernels (each a ``torch.library.custom_op`` behind a torch.func-ready ``autograd.Function``):
- forward: O and the log-sum-exp (online softmax, exp2);
- tangent: a second pass that reuses the saved log-sum-exp, so P is exact per block and needs no rescaling:
  tO = sum_j (P * tS) V + sum_j P tV - (sum_j rowsum(P * tS)) * O: 5 matmuls, 7 with the forward's 2. This is the
  form ``torch.func.jvp`` of a model can use: ``autograd.Function`` runs ``forward`` before ``jvp``, without the
  tangents.
- fused forward + tangent: O, the log-sum-exp and tO in one pass with online rescaling, 6 matmuls, for
  ``attention_with_tangent`` (the model's explicit tangent pass, which has the tangents up front). Which of the two
  that entry point runs (``FUSED_TANGENT``) is set by measurement: benchmarks/test_attention.py times both.
- backward: the flash-attention-2 backward for O (dK, dV over key blocks; dQ over query blocks; no atomics).
Memory is O(L) in every pass: nothing of size Lq x Lk is stored.

Caution:
- The tangent output is not differentiable (MeanFlow uses it under stop-gradient): a backward through it raises.
- fp32 inputs use 3xTF32 dots (fp32-level accuracy, smaller tiles); bf16 / fp16 use tensor cores (wgmma on sm_90)
  with fp32 accumulation.
- Under ``torch.compile`` the kernel path is a graph break (``torch.compiler.disable``): compiled ``torch.func.jvp``
  would otherwise silently drop the custom tangent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.common import (
    INTERPRET,
    LN2,
    LOG2E,
    any_wrapped,
    cast_out,
    needs_autograd,
    new_output,
    program_block,
    signature,
)

HEAD_DIMS = (32, 64, 128)


@triton.jit
def _dot(a, b, TF32X3: tl.constexpr):
    if TF32X3:
        return tl.dot(a, b, input_precision="tf32x3")  # 3xTF32: fp32-level accuracy on tensor cores
    return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, TF32X3: tl.constexpr):
    """acc + a @ b, accumulated in place (one wgmma chain on sm_90)."""
    if TF32X3:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _load_tile(base, o_l, m_l, s_l, o_d, F32: tl.constexpr):
    """[len(o_l), D] tile of a (L, D) slice with row stride s_l and unit column stride; rows past the end are 0."""
    b = tl.load(base + o_l[:, None].to(tl.int64) * s_l + o_d[None, :], mask=m_l[:, None], other=0.)
    if F32:
        b = b.to(tl.float32)
    return b


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
    H, Lq, Lk, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr, TF32X3: tl.constexpr,
    RTNE: tl.constexpr,
):
    i_bh, i_b, i_h, o_m, m_m, o_n, o_d = program_block(H, Lq, BM, BN, D)
    b_q = _load_tile(q_ptr + i_b * sq_b + i_h * sq_h, o_m, m_m, sq_l, o_d, F32)  # [BM, D]
    k_base = k_ptr + i_b * sk_b + i_h * sk_h
    v_base = v_ptr + i_b * sv_b + i_h * sv_h
    qk_scale = scale * LOG2E  # scores in log2 units: exp2 instead of exp
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    for start in range(0, Lk, BN):
        o_kv = start + o_n
        m_kv = o_kv < Lk
        b_k = _load_tile(k_base, o_kv, m_kv, sk_l, o_d, F32)  # [BN, D]
        b_v = _load_tile(v_base, o_kv, m_kv, sv_l, o_d, F32)  # [BN, D]
        b_s = _dot(b_q, tl.trans(b_k), TF32X3) * qk_scale  # [BM, BN]
        b_s = tl.where(m_kv[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        acc = _dot_acc(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], TF32X3)
        m_i = m_new
    b_o = acc / l_i[:, None]
    o_base = o_ptr + i_b * so_b + i_h * so_h
    tl.store(o_base + o_m[:, None].to(tl.int64) * so_l + o_d[None, :], cast_out(b_o, o_ptr, RTNE),
             mask=m_m[:, None])
    # Natural-log LSE, (B, H, Lq) contiguous.
    tl.store(lse_ptr + i_bh.to(tl.int64) * Lq + o_m, (m_i + tl.log2(l_i)) * LN2, mask=m_m)


@triton.jit
def _attn_tangent_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, lse_ptr, to_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
    stq_b, stq_h, stq_l, stk_b, stk_h, stk_l, stv_b, stv_h, stv_l, so_b, so_h, so_l,
    H, Lq, Lk, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr, TF32X3: tl.constexpr,
    RTNE: tl.constexpr,
):
    i_bh, i_b, i_h, o_m, m_m, o_n, o_d = program_block(H, Lq, BM, BN, D)
    b_q = _load_tile(q_ptr + i_b * sq_b + i_h * sq_h, o_m, m_m, sq_l, o_d, F32)  # [BM, D]
    b_tq = _load_tile(tq_ptr + i_b * stq_b + i_h * stq_h, o_m, m_m, stq_l, o_d, F32)  # [BM, D]
    b_lse = tl.load(lse_ptr + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.) * LOG2E  # [BM]
    k_base, tk_base = k_ptr + i_b * sk_b + i_h * sk_h, tk_ptr + i_b * stk_b + i_h * stk_h
    v_base, tv_base = v_ptr + i_b * sv_b + i_h * sv_h, tv_ptr + i_b * stv_b + i_h * stv_h
    qk_scale = scale * LOG2E
    acc = tl.zeros([BM, D], dtype=tl.float32)  # sum (P * tS) V + P tV: one accumulator for both matmuls
    r_i = tl.zeros([BM], dtype=tl.float32)  # sum rowsum(P * tS)
    for start in range(0, Lk, BN):
        o_kv = start + o_n
        m_kv = o_kv < Lk
        b_k = _load_tile(k_base, o_kv, m_kv, sk_l, o_d, F32)  # [BN, D]
        b_tk = _load_tile(tk_base, o_kv, m_kv, stk_l, o_d, F32)  # [BN, D]
        b_v = _load_tile(v_base, o_kv, m_kv, sv_l, o_d, F32)  # [BN, D]
        b_tv = _load_tile(tv_base, o_kv, m_kv, stv_l, o_d, F32)  # [BN, D]
        b_s = _dot(b_q, tl.trans(b_k), TF32X3) * qk_scale  # [BM, BN]
        b_p = tl.where(m_kv[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)  # exact P from the saved LSE
        b_ts = _dot_acc(b_q, tl.trans(b_tk), _dot(b_tq, tl.trans(b_k), TF32X3), TF32X3) * scale  # [BM, BN]
        b_pts = b_p * b_ts
        r_i += tl.sum(b_pts, axis=1)
        acc = _dot_acc(b_pts.to(b_v.dtype), b_v, acc, TF32X3)
        acc = _dot_acc(b_p.to(b_tv.dtype), b_tv, acc, TF32X3)
    b_o = _load_tile(o_ptr + i_b * so_b + i_h * so_h, o_m, m_m, so_l, o_d, True)  # [BM, D]
    b_to = acc - r_i[:, None] * b_o
    to_base = to_ptr + i_b * so_b + i_h * so_h
    tl.store(to_base + o_m[:, None].to(tl.int64) * so_l + o_d[None, :], cast_out(b_to, to_ptr, RTNE),
             mask=m_m[:, None])


@triton.jit
def _attn_fwd_tangent_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, lse_ptr, to_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
    stq_b, stq_h, stq_l, stk_b, stk_h, stk_l, stv_b, stv_h, stv_l, so_b, so_h, so_l,
    H, Lq, Lk, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr, TF32X3: tl.constexpr,
    RTNE: tl.constexpr,
):
    """O, LSE and tO in one pass (6 matmuls a block): online softmax with unnormalised p = exp(s - m_running);
    acc_o = sum p V, acc_t = sum (p * tS) V + p tV, r = sum rowsum(p * tS), l = sum rowsum(p), all rescaled when the
    running max moves; then O = acc_o / l, tO = acc_t / l - (r / l) * O."""
    i_bh, i_b, i_h, o_m, m_m, o_n, o_d = program_block(H, Lq, BM, BN, D)
    b_q = _load_tile(q_ptr + i_b * sq_b + i_h * sq_h, o_m, m_m, sq_l, o_d, F32)  # [BM, D]
    b_tq = _load_tile(tq_ptr + i_b * stq_b + i_h * stq_h, o_m, m_m, stq_l, o_d, F32)  # [BM, D]
    k_base, tk_base = k_ptr + i_b * sk_b + i_h * sk_h, tk_ptr + i_b * stk_b + i_h * stk_h
    v_base, tv_base = v_ptr + i_b * sv_b + i_h * sv_h, tv_ptr + i_b * stv_b + i_h * stv_h
    qk_scale = scale * LOG2E  # scores in log2 units
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    r_i = tl.zeros([BM], dtype=tl.float32)
    acc_o = tl.zeros([BM, D], dtype=tl.float32)
    acc_t = tl.zeros([BM, D], dtype=tl.float32)
    for start in range(0, Lk, BN):
        o_kv = start + o_n
        m_kv = o_kv < Lk
        b_k = _load_tile(k_base, o_kv, m_kv, sk_l, o_d, F32)  # [BN, D]
        b_tk = _load_tile(tk_base, o_kv, m_kv, stk_l, o_d, F32)  # [BN, D]
        b_s = _dot(b_q, tl.trans(b_k), TF32X3) * qk_scale  # [BM, BN]
        b_s = tl.where(m_kv[None, :], b_s, float("-inf"))
        b_ts = _dot_acc(b_q, tl.trans(b_tk), _dot(b_tq, tl.trans(b_k), TF32X3), TF32X3) * scale  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])  # [BM, BN], 0 on masked keys
        b_pts = b_p * b_ts
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        r_i = r_i * alpha + tl.sum(b_pts, axis=1)
        b_v = _load_tile(v_base, o_kv, m_kv, sv_l, o_d, F32)  # [BN, D]
        b_tv = _load_tile(tv_base, o_kv, m_kv, stv_l, o_d, F32)  # [BN, D]
        acc_o = _dot_acc(b_p.to(b_v.dtype), b_v, acc_o * alpha[:, None], TF32X3)
        acc_t = _dot_acc(b_pts.to(b_v.dtype), b_v, acc_t * alpha[:, None], TF32X3)
        acc_t = _dot_acc(b_p.to(b_tv.dtype), b_tv, acc_t, TF32X3)
        m_i = m_new
    b_o = acc_o / l_i[:, None]
    b_to = acc_t / l_i[:, None] - (r_i / l_i)[:, None] * b_o
    off = i_b * so_b + i_h * so_h + o_m[:, None].to(tl.int64) * so_l + o_d[None, :]
    tl.store(o_ptr + off, cast_out(b_o, o_ptr, RTNE), mask=m_m[:, None])
    tl.store(to_ptr + off, cast_out(b_to, to_ptr, RTNE), mask=m_m[:, None])
    tl.store(lse_ptr + i_bh.to(tl.int64) * Lq + o_m, (m_i + tl.log2(l_i)) * LN2, mask=m_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l, sg_b, sg_h, sg_l,
    H, Lq, Lk, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr, TF32X3: tl.constexpr,
    RTNE: tl.constexpr,
):
    """One block of keys: loop over all queries; dV = P^T dO, dK = scale * dS^T Q with dS = P * (dP - delta)."""
    i_bh, i_b, i_h, o_n, m_n, o_m0, o_d = program_block(H, Lk, BN, BM, D)
    b_k = _load_tile(k_ptr + i_b * sk_b + i_h * sk_h, o_n, m_n, sk_l, o_d, F32)  # [BN, D]
    b_v = _load_tile(v_ptr + i_b * sv_b + i_h * sv_h, o_n, m_n, sv_l, o_d, F32)  # [BN, D]
    q_base = q_ptr + i_b * sq_b + i_h * sq_h
    do_base = do_ptr + i_b * so_b + i_h * so_h
    qk_scale = scale * LOG2E
    acc_dk = tl.zeros([BN, D], dtype=tl.float32)
    acc_dv = tl.zeros([BN, D], dtype=tl.float32)
    for start in range(0, Lq, BM):
        o_m = start + o_m0
        m_m = o_m < Lq
        b_q = _load_tile(q_base, o_m, m_m, sq_l, o_d, F32)  # [BM, D]
        b_do = _load_tile(do_base, o_m, m_m, so_l, o_d, F32)  # [BM, D]
        b_lse = tl.load(lse_ptr + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.) * LOG2E
        b_delta = tl.load(delta_ptr + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.)  # [BM]
        b_s = _dot(b_q, tl.trans(b_k), TF32X3) * qk_scale  # [BM, BN]
        b_p = tl.where(m_m[:, None] & m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        acc_dv = _dot_acc(tl.trans(b_p).to(b_do.dtype), b_do, acc_dv, TF32X3)  # [BN, D]
        b_dp = _dot(b_do, tl.trans(b_v), TF32X3)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        acc_dk = _dot_acc(tl.trans(b_ds).to(b_q.dtype), b_q, acc_dk, TF32X3)  # [BN, D]
    o_g = o_n[:, None].to(tl.int64) * sg_l + o_d[None, :]
    g_off = i_b * sg_b + i_h * sg_h
    tl.store(dk_ptr + g_off + o_g, cast_out(acc_dk * scale, dk_ptr, RTNE), mask=m_n[:, None])
    tl.store(dv_ptr + g_off + o_g, cast_out(acc_dv, dv_ptr, RTNE), mask=m_n[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l, sg_b, sg_h, sg_l,
    H, Lq, Lk, scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, F32: tl.constexpr, TF32X3: tl.constexpr,
    RTNE: tl.constexpr,
):
    """One block of queries: loop over all keys; dQ = scale * dS K."""
    i_bh, i_b, i_h, o_m, m_m, o_n0, o_d = program_block(H, Lq, BM, BN, D)
    b_q = _load_tile(q_ptr + i_b * sq_b + i_h * sq_h, o_m, m_m, sq_l, o_d, F32)  # [BM, D]
    b_do = _load_tile(do_ptr + i_b * so_b + i_h * so_h, o_m, m_m, so_l, o_d, F32)  # [BM, D]
    b_lse = tl.load(lse_ptr + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.) * LOG2E
    b_delta = tl.load(delta_ptr + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=0.)  # [BM]
    k_base = k_ptr + i_b * sk_b + i_h * sk_h
    v_base = v_ptr + i_b * sv_b + i_h * sv_h
    qk_scale = scale * LOG2E
    acc_dq = tl.zeros([BM, D], dtype=tl.float32)
    for start in range(0, Lk, BN):
        o_n = start + o_n0
        m_n = o_n < Lk
        b_k = _load_tile(k_base, o_n, m_n, sk_l, o_d, F32)  # [BN, D]
        b_v = _load_tile(v_base, o_n, m_n, sv_l, o_d, F32)  # [BN, D]
        b_s = _dot(b_q, tl.trans(b_k), TF32X3) * qk_scale  # [BM, BN]
        b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = _dot(b_do, tl.trans(b_v), TF32X3)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        acc_dq = _dot_acc(b_ds.to(b_k.dtype), b_k, acc_dq, TF32X3)  # [BM, D]
    dq_base = dq_ptr + i_b * sg_b + i_h * sg_h
    tl.store(dq_base + o_m[:, None].to(tl.int64) * sg_l + o_d[None, :], cast_out(acc_dq * scale, dq_ptr, RTNE),
             mask=m_m[:, None])


def _s(name: str, t: torch.Tensor) -> dict[str, int]:
    """The kernels' stride arguments of a (B, H, L, D) tensor: s<name>_b, s<name>_h, s<name>_l (D has unit stride)."""
    assert t.stride(3) == 1, "the last dim must have unit stride"
    return {f"s{name}_b": t.stride(0), f"s{name}_h": t.stride(1), f"s{name}_l": t.stride(2)}


def _flags(q: torch.Tensor) -> dict:
    f32 = q.dtype == torch.float32
    return dict(F32=f32 or INTERPRET, TF32X3=f32, RTNE=INTERPRET)


def _config(q: torch.Tensor, kind: str):
    arch = tiles.arch_family(q.device) if q.is_cuda else 90
    return tiles.attention(q.shape[-1], kind, arch, q.dtype == torch.float32)


def attn_fwd(q, k, v, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = new_output(q, (B, H, Lq, D))
    lse = new_output(q, (B, H, Lq), torch.float32)
    BM, BN, warps, stages = _config(q, "fwd")
    _attn_fwd_kernel[(-(-Lq // BM), B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=o, lse_ptr=lse, **_s("q", q), **_s("k", k), **_s("v", v), **_s("o", o),
        H=H, Lq=Lq, Lk=Lk, scale=scale, D=D, BM=BM, BN=BN, **_flags(q), num_warps=warps, num_stages=stages,
    )
    return o, lse


def attn_tangent(q, k, v, tq, tk, tv, o, lse, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    to = new_output(q, (B, H, Lq, D))
    BM, BN, warps, stages = _config(q, "tangent")
    _attn_tangent_kernel[(-(-Lq // BM), B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, tq_ptr=tq, tk_ptr=tk, tv_ptr=tv, o_ptr=o, lse_ptr=lse, to_ptr=to,
        **_s("q", q), **_s("k", k), **_s("v", v), **_s("tq", tq), **_s("tk", tk), **_s("tv", tv), **_s("o", o),
        H=H, Lq=Lq, Lk=Lk, scale=scale, D=D, BM=BM, BN=BN, **_flags(q), num_warps=warps, num_stages=stages,
    )
    return to


def attn_fwd_tangent(q, k, v, tq, tk, tv, scale: float):
    """O, LSE and tO in one fused pass (the explicit entry point's kernel)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = new_output(q, (B, H, Lq, D))
    to = new_output(q, (B, H, Lq, D))
    lse = new_output(q, (B, H, Lq), torch.float32)
    BM, BN, warps, stages = _config(q, "fused")
    _attn_fwd_tangent_kernel[(-(-Lq // BM), B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, tq_ptr=tq, tk_ptr=tk, tv_ptr=tv, o_ptr=o, lse_ptr=lse, to_ptr=to,
        **_s("q", q), **_s("k", k), **_s("v", v), **_s("tq", tq), **_s("tk", tk), **_s("tv", tv), **_s("o", o),
        H=H, Lq=Lq, Lk=Lk, scale=scale, D=D, BM=BM, BN=BN, **_flags(q), num_warps=warps, num_stages=stages,
    )
    return o, lse, to


def attn_bwd(do, q, k, v, o, lse, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, Lq): rowsum(dO * O) = rowsum(P * dP)
    dq = new_output(q, (B, H, Lq, D))
    dk = new_output(q, (B, H, Lk, D))
    dv = new_output(q, (B, H, Lk, D))
    BM, BN, warps, stages = _config(q, "dkdv")
    _attn_bwd_dkdv_kernel[(-(-Lk // BN), B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse_ptr=lse, delta_ptr=delta, dk_ptr=dk, dv_ptr=dv,
        **_s("q", q), **_s("k", k), **_s("v", v), **_s("o", do), **_s("g", dk), H=H, Lq=Lq, Lk=Lk, scale=scale,
        D=D, BM=BM, BN=BN, **_flags(q), num_warps=warps, num_stages=stages,
    )
    BM, BN, warps, stages = _config(q, "dq")
    _attn_bwd_dq_kernel[(-(-Lq // BM), B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
        **_s("q", q), **_s("k", k), **_s("v", v), **_s("o", do), **_s("g", dq), H=H, Lq=Lq, Lk=Lk, scale=scale,
        D=D, BM=BM, BN=BN, **_flags(q), num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


@torch.library.custom_op("mfsr::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_fwd(q, k, v, scale)


@_attn_fwd_op.register_fake
def _(q, k, v, scale):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("mfsr::attn_tangent", mutates_args=())
def _attn_tangent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                 tv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    return attn_tangent(q, k, v, tq, tk, tv, o, lse, scale)


@_attn_tangent_op.register_fake
def _(q, k, v, tq, tk, tv, o, lse, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("mfsr::attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn_bwd(do, q, k, v, o, lse, scale)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class FlashAttention(torch.autograd.Function):
    """(q, k, v) -> (O, LSE). Reverse mode for O, forward mode (the Function's ``jvp``) for O; LSE is not
    differentiable."""

    @staticmethod
    def forward(q, k, v, scale):
        return attn_fwd(q, k, v, scale)  # the launcher directly: see kernels/adaln.py's Function

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        bwd = torch.ops.mfsr.attn_bwd if any_wrapped(do, q) else attn_bwd
        dq, dk, dv = bwd(_unit_last(do), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale):
        q, k, v, o, lse = ctx.saved_tensors
        tq = torch.zeros_like(q) if tq is None else _unit_last(tq)
        tk = torch.zeros_like(k) if tk is None else _unit_last(tk)
        tv = torch.zeros_like(v) if tv is None else _unit_last(tv)
        tangent = torch.ops.mfsr.attn_tangent if any_wrapped(q, tq, tk, tv) else attn_tangent
        return tangent(q, k, v, tq, tk, tv, o, lse, ctx.scale), None


class FlashAttentionWithTangent(torch.autograd.Function):
    """(q, k, v, tq, tk, tv) -> (O, LSE, tO) from the fused kernel. Reverse mode for O (the flash backward); LSE and
    tO are not differentiable (tO is consumed under stop-gradient); the tangents get no gradient."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, scale):
        return attn_fwd_tangent(q, k, v, tq, tk, tv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale = inputs
        o, lse, to = output
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse, to)

    @staticmethod
    def backward(ctx, do, _dlse, _dto):
        q, k, v, o, lse = ctx.saved_tensors
        bwd = torch.ops.mfsr.attn_bwd if any_wrapped(do, q) else attn_bwd
        dq, dk, dv = bwd(_unit_last(do), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None, None, None, None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors for what the kernel cannot take (shapes were checked by kernels.attention)."""
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"attention: the Triton kernel takes head dims {HEAD_DIMS}, got {D}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: the Triton kernel takes fp32, bf16 or fp16 q, k, v of one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("attention: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                         "is imported, to run the kernel on the CPU)")
    if q.is_cuda and q.dtype == torch.float32 and D not in tiles.GPU_FP32_HEAD_DIMS:
        raise ValueError(f"attention: fp32 on the GPU takes head dims {tiles.GPU_FP32_HEAD_DIMS} (head dim {D} spills "
                         "registers); use bf16/fp16 or backend='reference'")


# Dynamo drops the custom jvp of an autograd.Function traced inside torch.compile(torch.func.jvp(...)) and returns a
# wrong tangent (measured: tests/test_attention_kernel.py); run the kernel path eagerly instead (a graph break).
@torch.compiler.disable
def attention_with_lse(q, k, v, scale: float | None = None):
    """O and the natural-log LSE (B, H, Lq) in fp32; differentiable in O (reverse and forward mode)."""
    check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if needs_autograd(q, k, v):
        return FlashAttention.apply(q, k, v, scale)
    return attn_fwd(q, k, v, scale)


def attention(q, k, v, scale: float | None = None):
    """Triton path of ``kernels.attention``."""
    return attention_with_lse(q, k, v, scale)[0]


# The explicit entry point's default: True runs the fused single pass (6 matmuls), False the forward kernel and then
# the tangent pass on its saved LSE (7 matmuls; the only form torch.func.jvp can use, since autograd.Function runs
# forward before jvp without the tangents). The fused pass is the faster on an H100 (docs/results/kernels.md).
FUSED_TANGENT = True
# Head dims the fused kernel takes: with D = 128 its two [BM, D] accumulators and four operand tiles spill on sm_90
# in every tile with wgmma (ptxas -v, Triton 3.9), so D = 128 always runs the two passes.
FUSED_HEAD_DIMS = (32, 64)


@torch.compiler.disable
def attention_with_tangent(q, k, v, tq=None, tk=None, tv=None, scale: float | None = None,
                           fused: bool | None = None):
    """(O, tO): O as ``attention`` (differentiable in reverse mode) and its forward-mode tangent for the input
    tangents (None = zero), detached. ``fused`` (default ``FUSED_TANGENT``): one pass for O, LSE and tO, or the
    forward kernel then the tangent pass on the saved log-sum-exp."""
    check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fused = (FUSED_TANGENT if fused is None else fused) and q.shape[-1] in FUSED_HEAD_DIMS
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    with torch.no_grad():
        tq, tk, tv = (torch.zeros_like(x) if t is None else _unit_last(t.detach().to(x.dtype))
                      for x, t in ((q, tq), (k, tk), (v, tv)))
    if fused:
        if needs_autograd(q, k, v):
            o, _, to = FlashAttentionWithTangent.apply(q, k, v, tq, tk, tv, scale)
        else:
            o, _, to = attn_fwd_tangent(q, k, v, tq, tk, tv, scale)
        return o, to
    o, lse = attention_with_lse(q, k, v, scale)
    with torch.no_grad():
        to = attn_tangent(q.detach(), k.detach(), v.detach(), tq, tk, tv, o.detach(), lse, scale)
    return o, to


def aot_configs(dtypes=("bf16", "fp32"), archs=(90, 80)):
    """Every (kernel, signature, constexprs, arch, options) the launchers pick on a GPU: per architecture family,
    16-bit (bf16 stands for fp16: same code and tiles) and fp32 inputs, 3 head dims, 4 kernels.
    Compile them in a process without TRITON_INTERPRET (``python -m kernels.aot``)."""
    for arch in archs:
        for dt in dtypes:
            for D in (tiles.GPU_FP32_HEAD_DIMS if dt == "fp32" else HEAD_DIMS):
                yield from _aot_one(arch, dt, D)


def _aot_one(arch, dt, D):
    f32 = dt == "fp32"
    kernels_ = dict(fwd=_attn_fwd_kernel, tangent=_attn_tangent_kernel, fused=_attn_fwd_tangent_kernel,
                    dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel)
    for kind, fn in kernels_.items():
        if kind == "fused" and D not in FUSED_HEAD_DIMS:
            continue
        BM, BN, warps, stages = (tiles.ATTENTION_32 if f32 else tiles.ATTENTION_16)[arch][kind][D]
        yield (fn, signature(fn, dt, fp32_ptrs=("lse_ptr", "delta_ptr")),
               dict(D=D, BM=BM, BN=BN, F32=f32, TF32X3=f32, RTNE=False), arch, dict(num_warps=warps, num_stages=stages))
