"""Fused gated residual + LayerNorm + adaLN modulation (DiT adaLN-Zero under MeanFlow's (t, r) conditioning).

    x' = x + gate * h          (optional gated residual)
    y  = LN(x') * (1 + scale) + shift      (LayerNorm without affine, statistics in fp32)

x, h: (B, L, D) contiguous, fp32 / bf16 / fp16; shift, scale, gate: (B, D) per sample, fp32 or the activation dtype.
Any D (masked to the next power of two) and any L. Derivations of the backward and the tangent: kernels/README.md.

Kernels: forward (y, x', and the row statistics), backward (dx, dh and per-sample partial sums for dshift, dscale,
dgate in the same pass over the activations), JVP (tangents of x' and y from the tangents of every input, in one pass,
reusing the forward's statistics). Each launcher is also registered as a ``torch.library.custom_op`` (mfsr::adaln_*,
with fake implementations) for tracing; the autograd.Function calls the launchers directly (torch.func hands it plain
tensors), and calls that need no autograd (inference) skip the Function altogether.

Caution:
- One row of D features lives in registers: D up to 4096 (SD3.5 uses 1536); ``backend='auto'`` sends wider rows
  to the reference.
- The tangent output is not differentiable (MeanFlow uses it under stop-gradient); a backward through it raises.
- Under ``torch.compile`` the kernel path is a graph break (``torch.compiler.disable``): compiled ``torch.func.jvp``
  would otherwise silently drop the custom tangent. The custom ops still have fake implementations for tracing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.common import INTERPRET, any_wrapped, cast_out, needs_autograd, new_output, signature
from kernels.reference import check_adaln_args, mod_rows

# One row lives in registers; wider rows spill on sm_80/sm_90 (checked by tests/test_gpu_readiness.py).
MAX_D = 4096


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, h_ptr, shift_ptr, scale_ptr, gate_ptr,
    y_ptr, xres_ptr, mean_ptr, rstd_ptr,
    L, D, s_shift, s_scale, s_gate, eps,
    HAS_RES: tl.constexpr, RPP: tl.constexpr, BD: tl.constexpr, RTNE: tl.constexpr,
):
    i_l, i_b = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_shift = tl.load(shift_ptr + i_b * s_shift + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    b_scale = tl.load(scale_ptr + i_b * s_scale + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    if HAS_RES:
        b_gate = tl.load(gate_ptr + i_b * s_gate + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    for i in range(RPP):
        row = i_l * RPP + i
        m_row = row < L
        m = m_d & ((o_d * 0 + row) < L)
        o_row = (i_b * L + row).to(tl.int64)
        b_x = tl.load(x_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
        if HAS_RES:
            b_h = tl.load(h_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
            b_x = b_x + b_gate * b_h
            tl.store(xres_ptr + o_row * D + o_d, cast_out(b_x, xres_ptr, RTNE), mask=m)
        mean = tl.sum(b_x, axis=0) / D
        b_xc = tl.where(m_d, b_x - mean, 0.)
        var = tl.sum(b_xc * b_xc, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        b_y = b_xc * rstd * (1.0 + b_scale) + b_shift
        tl.store(y_ptr + o_row * D + o_d, cast_out(b_y, y_ptr, RTNE), mask=m)
        tl.store(mean_ptr + o_row, mean, mask=m_row)
        tl.store(rstd_ptr + o_row, rstd, mask=m_row)


@triton.jit
def _saved_row(xres_ptr, mean_ptr, rstd_ptr, i_b, row, L, D, o_d, m_d):
    """Row ``row`` of sample i_b as the forward pass left it: its flat offset, its element mask, rstd and the
    normalised x_hat = (x' - mean) * rstd, [BD] in fp32 (0 outside the row)."""
    m = m_d & ((o_d * 0 + row) < L)
    o_row = (i_b * L + row).to(tl.int64)
    mean = tl.load(mean_ptr + o_row, mask=row < L, other=0.)
    rstd = tl.load(rstd_ptr + o_row, mask=row < L, other=0.)
    b_x = tl.load(xres_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
    return o_row, m, rstd, tl.where(m, (b_x - mean) * rstd, 0.)


@triton.jit
def _adaln_bwd_kernel(
    dy_ptr, dxres_ptr, xres_ptr, h_ptr, scale_ptr, gate_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dh_ptr, dshift_ptr, dscale_ptr, dgate_ptr,
    L, D, B, s_scale, s_gate,
    HAS_RES: tl.constexpr, HAS_DXRES: tl.constexpr, RPP: tl.constexpr, BD: tl.constexpr, RTNE: tl.constexpr,
):
    i_l, i_b = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_scale = tl.load(scale_ptr + i_b * s_scale + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    if HAS_RES:
        b_gate = tl.load(gate_ptr + i_b * s_gate + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    acc_dshift = tl.zeros([BD], dtype=tl.float32)
    acc_dscale = tl.zeros([BD], dtype=tl.float32)
    acc_dgate = tl.zeros([BD], dtype=tl.float32)
    for i in range(RPP):
        o_row, m, rstd, b_xh = _saved_row(xres_ptr, mean_ptr, rstd_ptr, i_b, i_l * RPP + i, L, D, o_d, m_d)
        b_dy = tl.load(dy_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
        b_dxh = b_dy * (1.0 + b_scale)
        c_xh = tl.sum(b_dxh * b_xh, axis=0) / D
        c_1 = tl.sum(b_dxh, axis=0) / D
        b_dx = tl.where(m, (b_dxh - c_1 - b_xh * c_xh) * rstd, 0.)
        if HAS_DXRES:
            b_dx += tl.load(dxres_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)
        tl.store(dx_ptr + o_row * D + o_d, cast_out(b_dx, dx_ptr, RTNE), mask=m)
        acc_dshift += b_dy
        acc_dscale += b_dy * b_xh
        if HAS_RES:
            b_h = tl.load(h_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
            tl.store(dh_ptr + o_row * D + o_d, cast_out(b_gate * b_dx, dh_ptr, RTNE), mask=m)
            acc_dgate += b_dx * b_h
    # Per-program partial sums, (n_programs_L, B, D) fp32: summed over programs on the host.
    o_part = (i_l * B + i_b).to(tl.int64) * D
    tl.store(dshift_ptr + o_part + o_d, acc_dshift, mask=m_d)
    tl.store(dscale_ptr + o_part + o_d, acc_dscale, mask=m_d)
    if HAS_RES:
        tl.store(dgate_ptr + o_part + o_d, acc_dgate, mask=m_d)


@triton.jit
def _adaln_tangent_kernel(
    xres_ptr, h_ptr, tx_ptr, th_ptr, scale_ptr, gate_ptr, tshift_ptr, tscale_ptr, tgate_ptr, mean_ptr, rstd_ptr,
    ty_ptr, txres_ptr,
    L, D, s_scale, s_gate, s_tshift, s_tscale, s_tgate,
    HAS_RES: tl.constexpr, HAS_TX: tl.constexpr, HAS_TH: tl.constexpr, RPP: tl.constexpr, BD: tl.constexpr,
    RTNE: tl.constexpr,
):
    i_l, i_b = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_scale = tl.load(scale_ptr + i_b * s_scale + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    b_tshift = tl.load(tshift_ptr + i_b * s_tshift + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    b_tscale = tl.load(tscale_ptr + i_b * s_tscale + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    if HAS_RES:
        b_gate = tl.load(gate_ptr + i_b * s_gate + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
        b_tgate = tl.load(tgate_ptr + i_b * s_tgate + o_d, mask=m_d, other=0.).to(tl.float32)  # [BD]
    for i in range(RPP):
        o_row, m, rstd, b_xh = _saved_row(xres_ptr, mean_ptr, rstd_ptr, i_b, i_l * RPP + i, L, D, o_d, m_d)
        if HAS_TX:
            b_tx = tl.load(tx_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
        else:
            b_tx = tl.zeros([BD], dtype=tl.float32)
        if HAS_RES:
            # Tangent of x' = x + gate * h.
            b_h = tl.load(h_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)  # [BD]
            b_tx += b_tgate * b_h
            if HAS_TH:
                b_tx += b_gate * tl.load(th_ptr + o_row * D + o_d, mask=m, other=0.).to(tl.float32)
            tl.store(txres_ptr + o_row * D + o_d, cast_out(b_tx, txres_ptr, RTNE), mask=m)
        c_1 = tl.sum(b_tx, axis=0) / D
        c_xh = tl.sum(b_xh * b_tx, axis=0) / D
        b_txh = tl.where(m, rstd * (b_tx - c_1 - b_xh * c_xh), 0.)
        b_ty = b_txh * (1.0 + b_scale) + b_xh * b_tscale + b_tshift
        tl.store(ty_ptr + o_row * D + o_d, cast_out(b_ty, ty_ptr, RTNE), mask=m)


def _check(x: torch.Tensor, *mods: torch.Tensor | None) -> None:
    assert x.dim() == 3 and x.is_contiguous(), "x must be a contiguous (B, L, D) tensor"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}"
    assert x.shape[2] <= MAX_D, f"D = {x.shape[2]} > {MAX_D}"
    for m in mods:
        if m is not None:
            assert m.dim() == 2 and m.shape == (x.shape[0], x.shape[2]) and m.stride(1) == 1, \
                f"modulation must be (B, D) with unit stride, got {tuple(m.shape)}"


def adaln_fwd(x, shift, scale, gate, h, eps):
    _check(x, shift, scale, gate)
    B, L, D = x.shape
    has_res = h is not None
    if has_res:
        assert h.shape == x.shape and h.is_contiguous() and h.dtype == x.dtype
    y = new_output(x)
    xres = new_output(x) if has_res else x.new_empty(0)
    mean = new_output(x, (B, L), torch.float32)
    rstd = new_output(x, (B, L), torch.float32)
    BD, num_warps, rpp = tiles.adaln(D)
    grid = (-(-L // rpp), B)
    _adaln_fwd_kernel[grid](
        x_ptr=x, h_ptr=h if has_res else x, shift_ptr=shift, scale_ptr=scale, gate_ptr=gate if has_res else shift,
        y_ptr=y, xres_ptr=xres if has_res else y, mean_ptr=mean, rstd_ptr=rstd,
        L=L, D=D, s_shift=shift.stride(0), s_scale=scale.stride(0), s_gate=gate.stride(0) if has_res else 0, eps=eps,
        HAS_RES=has_res, RPP=rpp, BD=BD, RTNE=INTERPRET, num_warps=num_warps,
    )
    return y, xres, mean, rstd


def adaln_bwd(dy, dxres, xres, h, scale, gate, mean, rstd):
    _check(xres, scale, gate)
    B, L, D = xres.shape
    has_res = h is not None
    BD, num_warps, rpp = tiles.adaln(D, backward=True)
    n_l = -(-L // rpp)
    dx = new_output(xres)
    dh = new_output(xres) if has_res else xres.new_empty(0)
    part = new_output(xres, (3 if has_res else 2, n_l, B, D), torch.float32)
    _adaln_bwd_kernel[(n_l, B)](
        dy_ptr=dy, dxres_ptr=dxres if dxres is not None else dy, xres_ptr=xres, h_ptr=h if has_res else xres,
        scale_ptr=scale, gate_ptr=gate if has_res else scale, mean_ptr=mean, rstd_ptr=rstd,
        dx_ptr=dx, dh_ptr=dh if has_res else dx, dshift_ptr=part[0], dscale_ptr=part[1],
        dgate_ptr=part[2] if has_res else part[0],
        L=L, D=D, B=B, s_scale=scale.stride(0), s_gate=gate.stride(0) if has_res else 0,
        HAS_RES=has_res, HAS_DXRES=dxres is not None, RPP=rpp, BD=BD, RTNE=INTERPRET, num_warps=num_warps,
    )
    # Separate reductions: custom-op outputs must not alias each other.
    dgate = part[2].sum(0) if has_res else xres.new_empty(0)
    return dx, dh, part[0].sum(0), part[1].sum(0), dgate  # dshift, dscale, dgate: (B, D) fp32


def adaln_tangent(xres, h, tx, th, scale, gate, tshift, tscale, tgate, mean, rstd):
    _check(xres, scale, gate, tshift, tscale, tgate)
    B, L, D = xres.shape
    has_res = h is not None
    ty = new_output(xres)
    txres = new_output(xres) if has_res else xres.new_empty(0)
    BD, num_warps, rpp = tiles.adaln(D)
    _adaln_tangent_kernel[(-(-L // rpp), B)](
        xres_ptr=xres, h_ptr=h if has_res else xres, tx_ptr=tx if tx is not None else xres,
        th_ptr=th if th is not None else xres, scale_ptr=scale, gate_ptr=gate if has_res else scale,
        tshift_ptr=tshift, tscale_ptr=tscale, tgate_ptr=tgate if has_res else tshift, mean_ptr=mean, rstd_ptr=rstd,
        ty_ptr=ty, txres_ptr=txres if has_res else ty,
        L=L, D=D, s_scale=scale.stride(0), s_gate=gate.stride(0) if has_res else 0, s_tshift=tshift.stride(0),
        s_tscale=tscale.stride(0), s_tgate=tgate.stride(0) if has_res else 0,
        HAS_RES=has_res, HAS_TX=tx is not None, HAS_TH=th is not None, RPP=rpp, BD=BD, RTNE=INTERPRET,
        num_warps=num_warps,
    )
    return ty, txres


@torch.library.custom_op("mfsr::adaln_fwd", mutates_args=())
def _adaln_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None,
                  h: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_fwd(x, shift, scale, gate, h, eps)


@_adaln_fwd_op.register_fake
def _(x, shift, scale, gate, h, eps):
    B, L, _ = x.shape
    stats = x.new_empty((B, L), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x) if h is not None else x.new_empty(0), stats, torch.empty_like(stats)


@torch.library.custom_op("mfsr::adaln_bwd", mutates_args=())
def _adaln_bwd_op(dy: torch.Tensor, dxres: torch.Tensor | None, xres: torch.Tensor, h: torch.Tensor | None,
                  scale: torch.Tensor, gate: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_bwd(dy, dxres, xres, h, scale, gate, mean, rstd)


@_adaln_bwd_op.register_fake
def _(dy, dxres, xres, h, scale, gate, mean, rstd):
    B, _, D = xres.shape
    red = xres.new_empty((B, D), dtype=torch.float32)
    has_res = h is not None
    return (torch.empty_like(xres), torch.empty_like(xres) if has_res else xres.new_empty(0), red,
            torch.empty_like(red), torch.empty_like(red) if has_res else xres.new_empty(0))


@torch.library.custom_op("mfsr::adaln_tangent", mutates_args=())
def _adaln_tangent_op(xres: torch.Tensor, h: torch.Tensor | None, tx: torch.Tensor | None, th: torch.Tensor | None,
                  scale: torch.Tensor, gate: torch.Tensor | None, tshift: torch.Tensor, tscale: torch.Tensor,
                  tgate: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return adaln_tangent(xres, h, tx, th, scale, gate, tshift, tscale, tgate, mean, rstd)


@_adaln_tangent_op.register_fake
def _(xres, h, tx, th, scale, gate, tshift, tscale, tgate, mean, rstd):
    return torch.empty_like(xres), torch.empty_like(xres) if h is not None else xres.new_empty(0)


def _mod_tangent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t.reshape(like.shape).contiguous()


class AdaLNModulate(torch.autograd.Function):
    """(x, shift, scale, gate, h) -> (y, x'); x' is empty without a residual. Reverse mode and torch.func.jvp."""

    @staticmethod
    def forward(x, shift, scale, gate, h, eps):
        # forward gets plain tensors (torch.func unwraps them first): the launcher directly, since a custom op's
        # Python dispatch costs about as much as a small kernel. backward/jvp may get wrapped ones: see any_wrapped.
        return adaln_fwd(x, shift, scale, gate, h, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, gate, h, eps = inputs
        y, xres, mean, rstd = output
        ctx.has_res = h is not None
        ctx.mod_dtypes = (shift.dtype, scale.dtype, gate.dtype if gate is not None else None)
        saved_x = xres if ctx.has_res else x
        ctx.save_for_backward(saved_x, h, scale, gate, mean, rstd)
        ctx.save_for_forward(saved_x, h, scale, gate, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dy, dxres, _dmean, _drstd):
        xs, h, scale, gate, mean, rstd = ctx.saved_tensors
        dxres = dxres.contiguous() if ctx.has_res and dxres is not None and dxres.numel() else None
        bwd = torch.ops.mfsr.adaln_bwd if any_wrapped(dy, xs) else adaln_bwd
        dx, dh, dshift, dscale, dgate = bwd(dy.contiguous(), dxres, xs, h, scale, gate, mean, rstd)
        s_dt, sc_dt, g_dt = ctx.mod_dtypes
        return (dx, dshift.to(s_dt), dscale.to(sc_dt), dgate.to(g_dt) if ctx.has_res else None,
                dh if ctx.has_res else None, None)

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, tgate, th, _teps):
        xs, h, scale, gate, mean, rstd = ctx.saved_tensors
        tx = tx.contiguous() if tx is not None else None
        th = th.contiguous() if (th is not None and ctx.has_res) else None
        tangent = torch.ops.mfsr.adaln_tangent if any_wrapped(xs, tx, th, tshift, tscale, tgate) else adaln_tangent
        ty, txres = tangent(
            xs, h, tx, th, scale, gate, _mod_tangent(tshift, scale), _mod_tangent(tscale, scale),
            _mod_tangent(tgate, gate) if ctx.has_res else None, mean, rstd)
        return ty, txres, None, None


def _rows(m: torch.Tensor | None, x: torch.Tensor | None = None, name: str = "") -> torch.Tensor | None:
    """A (B, D) modulation with unit stride along D, as the kernels index it; checked against x (B, L, D) when
    given (``reference.mod_rows``: (B, 1, D) is taken too)."""
    if m is not None and x is not None:
        m = mod_rows(m, x, name)
    return m if m is None or m.stride(1) == 1 else m.contiguous()


# Dynamo drops the custom jvp of an autograd.Function traced inside torch.compile(torch.func.jvp(...)) and returns a
# wrong tangent (measured: tests/test_adaln_kernel.py); run the kernel path eagerly instead (a graph break).
@torch.compiler.disable
def adaln_modulate(x, shift, scale, gate=None, h=None, eps: float = 1e-6, _stats: bool = False):
    """Triton path of ``kernels.adaln_modulate``: y, or (x + gate * h, y) when ``h`` is given. ``_stats`` also
    returns what the tangent pass needs: (outputs, (x or x', mean, rstd))."""
    shift, scale, gate = (_rows(m) for m in check_adaln_args(x, shift, scale, gate, h))
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"adaln_modulate: the Triton kernel takes fp32, bf16 or fp16, got {x.dtype}")
    if x.shape[2] > MAX_D:
        raise ValueError(f"adaln_modulate: D = {x.shape[2]} exceeds the kernel's limit {MAX_D}")
    if not x.is_cuda and not INTERPRET:
        raise ValueError("adaln_modulate: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported, to run the kernel on the CPU)")
    if h is not None:
        h = h.to(x.dtype).contiguous()
    x = x.contiguous()
    if needs_autograd(x, shift, scale, gate, h):
        y, xres, mean, rstd = AdaLNModulate.apply(x, shift, scale, gate, h, float(eps))
    else:
        y, xres, mean, rstd = adaln_fwd(x, shift, scale, gate, h, float(eps))
    out = y if h is None else (xres, y)
    if _stats:
        return out, (xres if h is not None else x, mean, rstd)
    return out


@torch.compiler.disable
def adaln_modulate_with_tangent(x, shift, scale, gate=None, h=None, tx=None, tshift=None, tscale=None, tgate=None,
                                th=None, eps: float = 1e-6):
    """Triton path of ``kernels.adaln_modulate_with_tangent``: the outputs of ``adaln_modulate`` (differentiable in
    reverse mode) and their forward-mode tangents for the given input tangents (None = zero), detached."""
    out, (saved_x, mean, rstd) = adaln_modulate(x, shift, scale, gate=gate, h=h, eps=eps, _stats=True)
    has_res = h is not None
    B, _, D = saved_x.shape
    shift, scale = _rows(shift, saved_x, "shift"), _rows(scale, saved_x, "scale")
    gate = _rows(gate, saved_x, "gate") if has_res else None
    rows = lambda m, like, name: _mod_tangent(None if m is None else _rows(m.detach(), saved_x, name), like)  # noqa
    with torch.no_grad():
        ty, txres = adaln_tangent(
            saved_x.detach(), h.detach().to(saved_x.dtype).contiguous() if has_res else None,
            tx.detach().to(saved_x.dtype).contiguous() if tx is not None else None,
            th.detach().to(saved_x.dtype).contiguous() if (has_res and th is not None) else None,
            scale.detach(), gate.detach() if has_res else None, rows(tshift, shift, "tshift"),
            rows(tscale, scale, "tscale"), rows(tgate, gate, "tgate") if has_res else None, mean, rstd)
    return (out, ty) if not has_res else (out, (txres, ty))


def aot_configs(dtypes=("bf16",), archs=(90, 80), block_sizes=None):
    """Every (kernel, signature, constexprs, arch, num_warps) the launchers can pick on a GPU, for the given
    activation dtypes: all power-of-two row blocks up to MAX_D, with and without the gated residual.
    Compile them in a process without TRITON_INTERPRET (``python -m kernels.aot``)."""
    for arch in archs:
        for act in dtypes:
            for BD in block_sizes or [2 ** i for i in range(MAX_D.bit_length())]:
                for has_res in (False, True):
                    yield from _aot_one(arch, act, BD, has_res)


# Modulation vectors, statistics and their gradients / tangents are fp32; activations take the input's dtype.
_FP32_PTRS = ("shift_ptr", "scale_ptr", "gate_ptr", "mean_ptr", "rstd_ptr", "dshift_ptr", "dscale_ptr", "dgate_ptr",
              "tshift_ptr", "tscale_ptr", "tgate_ptr")


def _aot_one(arch, act, BD, has_res):
    _, num_warps, rpp = tiles.adaln(BD)
    yield (_adaln_fwd_kernel, signature(_adaln_fwd_kernel, act, _FP32_PTRS),
           dict(HAS_RES=has_res, RPP=rpp, BD=BD, RTNE=False), arch, num_warps)
    _, num_warps, rpp = tiles.adaln(BD, backward=True)
    yield (_adaln_bwd_kernel, signature(_adaln_bwd_kernel, act, _FP32_PTRS),
           dict(HAS_RES=has_res, HAS_DXRES=has_res, RPP=rpp, BD=BD, RTNE=False), arch, num_warps)
    _, num_warps, rpp = tiles.adaln(BD)
    yield (_adaln_tangent_kernel, signature(_adaln_tangent_kernel, act, _FP32_PTRS),
           dict(HAS_RES=has_res, HAS_TX=True, HAS_TH=has_res, RPP=rpp, BD=BD, RTNE=False), arch, num_warps)
