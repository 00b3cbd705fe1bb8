"""Triton flash attention with a forward-mode tangent (kernels/flash.py) against the fp64 math reference:
O, log-sum-exp, dq, dk, dv and tO. Interpreter on the CPU, compiled on a GPU when present."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_ref

import kernels
from kernels import reference

flash = kernels.flash
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


pytestmark = pytest.mark.usefixtures("poison")  # conftest: every kernel output starts as NaN


def _qkv(B, H, Lq, Lk, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(DEVICE) for n in (Lq, Lk, Lk)]


def _math(q, k, v):
    return reference.attention_math(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("L", [1, 63, 130, 257])
def test_forward_tangent_backward(L, D, dtype):
    B, H = 2, 2
    q, k, v = _qkv(B, H, L, L, D, seed=L + D)
    tq, tk, tv = _qkv(B, H, L, L, D, seed=1000 + L + D)
    do = _qkv(B, H, L, L, D, seed=2000 + L)[0]
    low = [t.to(dtype) for t in (q, k, v)]
    tlow = [t.to(dtype) for t in (tq, tk, tv)]

    # Forward: O and LSE.
    o, lse = flash.attention_with_lse(*low)
    o_ref, lse_ref = reference.attention_lse(*low)
    o64, lse64 = reference.attention_lse(q, k, v)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, L)
    assert_close_to_ref(o, o_ref, o64, "O")
    assert_close_to_ref(lse, lse_ref, lse64, "LSE")

    # Tangent, against the explicit formula and against torch.func.jvp of the fp64 reference.
    _, to = torch.func.jvp(lambda a, b, c: kernels.attention(a, b, c, backend="triton"), tuple(low), tuple(tlow))
    _, to_ref = torch.func.jvp(_math, tuple(low), tuple(tlow))
    to64 = reference.attention_tangent(q, k, v, tq, tk, tv)
    _, to64_ad = torch.func.jvp(_math, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(to64, to64_ad, rtol=1e-9, atol=1e-9)
    assert_close_to_ref(to, to_ref, to64, "tO")
    # The fused single pass (O, LSE and tO at once) of the explicit entry point.
    o_f, lse_f, to_f = flash.attn_fwd_tangent(*low, *tlow, D ** -0.5)
    assert_close_to_ref(o_f, o_ref, o64, "O fused")
    assert_close_to_ref(lse_f, lse_ref, lse64, "LSE fused")
    assert_close_to_ref(to_f, to_ref, to64, "tO fused")

    # Backward for O.
    def grads(fn, ts):
        ts = [t.detach().requires_grad_(True) for t in ts]
        return torch.autograd.grad(fn(*ts), ts, do.to(ts[0].dtype))

    g = grads(lambda a, b, c: kernels.attention(a, b, c, backend="triton"), low)
    # A non-contiguous upstream gradient (as from the model's transpose) must give the same result.
    ts = [t.detach().requires_grad_(True) for t in low]
    do_t = do.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    g_t = torch.autograd.grad(kernels.attention(*ts, backend="triton"), ts, do_t)
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g_ref = grads(_math, low)
    g64 = grads(_math, (q, k, v))
    for x, r, r64, name in zip(g, g_ref, g64, ("dq", "dk", "dv")):
        assert x.dtype == dtype
        assert_close_to_ref(x, r, r64, name)


def test_cross_lengths_scale_and_strided_inputs_without_copy():
    B, H, Lq, Lk, D = 2, 3, 45, 70, 64
    g = torch.Generator().manual_seed(7)
    # (B, L, H, D) storage seen as (B, H, L, D): the model's layout after projections.
    q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2)
    qf, kf, vf = (t.float() for t in (q, k, v))
    assert not qf.is_contiguous() and flash._unit_last(qf) is qf
    out = kernels.attention(qf, kf, vf, scale=0.2, backend="triton")
    assert_close_to_ref(out, reference.attention_math(qf, kf, vf, scale=0.2),
                        reference.attention_math(q, k, v, scale=0.2), "O strided")


def test_partial_tangents_and_parameter_gradients_through_the_tangent_pass_primal():
    torch.manual_seed(0)
    B, H, L, D = 2, 2, 40, 32
    proj = torch.nn.Linear(D, 3 * D).to(DEVICE)
    x = torch.randn(B, H, L, D, device=DEVICE)
    tx = torch.randn_like(x)

    def fn(backend):
        def f(x_):
            q, k, v = proj(x_).chunk(3, dim=-1)
            return kernels.attention(q, k, v, backend=backend)
        return f

    res = {}
    for backend in ("triton", "reference"):
        proj.zero_grad()
        out, tan = torch.func.jvp(fn(backend), (x,), (tx,))
        out.pow(2).sum().backward(retain_graph=True)
        res[backend] = [out.detach(), tan.detach()] + [p.grad.clone() for p in proj.parameters()]
        if backend == "triton" and tan.requires_grad:
            with pytest.raises(RuntimeError, match="autograd"):
                tan.sum().backward()
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Only q has a tangent: None tangents for k and v are zeros.
    q, k, v = (torch.randn(1, 1, 17, 32, device=DEVICE) for _ in range(3))
    tq = torch.randn_like(q)
    _, t1 = torch.func.jvp(lambda a: kernels.attention(a, k, v, backend="triton"), (q,), (tq,))
    _, t2 = torch.func.jvp(lambda a: _math(a, k, v), (q,), (tq,))
    torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-5)


def test_torch_compile_keeps_the_custom_tangent():
    """Dynamo drops a custom jvp traced inside torch.compile(torch.func.jvp(...)): the kernel path runs eagerly."""
    q, k, v, tq, tk, tv = (torch.randn(1, 2, 40, 32, device=DEVICE) for _ in range(6))
    f = lambda a, b, c: kernels.attention(a, b, c, backend="triton") * 2  # noqa: E731
    compiled = torch.compile(lambda *a: torch.func.jvp(f, a[:3], a[3:]), backend="aot_eager")
    _, t_c = compiled(q, k, v, tq, tk, tv)
    t_ref = reference.attention_tangent(q.double(), k.double(), v.double(), tq.double(), tk.double(), tv.double())
    torch.testing.assert_close(t_c.double(), 2 * t_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(q, k, v), f(q, k, v))


def test_bad_input_is_a_clear_error():
    x = torch.randn(1, 2, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        kernels.attention(x, x, x, backend="triton")
    y = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attention(y, y.double(), y, backend="triton")


def test_tiny_model_tangent_pass_triton_path_matches_reference_path():
    pytest.importorskip("diffusers")
    from conftest import randomize_

    from mfsr_fast import MFSRTransformer
    from mfsr_fast.sampling.meanflow import meanflow_target

    m = randomize_(MFSRTransformer.from_preset("tiny", num_layers=2, dual_attention_layers=(0,)), std=0.1).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 48, 8, 6, generator=g).to(DEVICE)
    lr = torch.randn(2, 48, 8, 6, generator=g).to(DEVICE)
    ctx = torch.randn(2, 4, m.cfg.context_dim, generator=g).to(DEVICE)
    t = torch.tensor([0.9, 0.5], device=DEVICE)
    r = torch.tensor([0.2, 0.5], device=DEVICE)
    v = torch.randn(2, 48, 8, 6, generator=g).to(DEVICE)
    out = {}
    for backend in ("triton", "reference"):
        m.set_kernel_backend(backend).zero_grad()
        u, u_tgt = meanflow_target(lambda z_, t_, r_: m(z_, lr, t_, r_, context=ctx), z, t, r, v)
        u.pow(2).mean().backward()
        out[backend] = (u.detach(), u_tgt, m.blocks[0].attn.to_q.weight.grad.clone())
    for a, b in zip(out["triton"], out["reference"]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


def test_inference_calls_skip_the_autograd_function(monkeypatch):
    q, k, v = (torch.randn(1, 2, 20, 32, device=DEVICE) for _ in range(3))
    ref = kernels.attention(q, k, v, backend="triton")
    monkeypatch.setattr(flash.FlashAttention, "apply", lambda *a: pytest.fail("Function used without autograd"))
    torch.testing.assert_close(kernels.attention(q, k, v, backend="triton"), ref, rtol=0, atol=0)
    with pytest.raises(pytest.fail.Exception):
        torch.func.jvp(lambda a: kernels.attention(a, k, v, backend="triton"), (q,), (q,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_tangent_entry_point(dtype):
    """``attention_with_tangent`` (the model's explicit JVP pass): O as ``attention`` and differentiable, tO against
    the fp64 formula, detached; a None tangent is zero. The reference path's chunked tangent matches its formula."""
    B, H, L, D = 2, 2, 63, 32
    q, k, v = _qkv(B, H, L, L, D, seed=L)
    tq, tk, tv = _qkv(B, H, L, L, D, seed=500 + L)
    o64, to64 = torch.func.jvp(lambda *a: reference.attention(*a), (q, k, v), (tq, tk, tv))  # autodiff, fp64
    torch.testing.assert_close(reference.attention_tangent(q, k, v, tq, tk, tv, chunk=7), to64, rtol=1e-10,
                               atol=1e-10)
    low = [t.to(dtype) for t in (q, k, v)]
    tlow = [t.to(dtype) for t in (tq, tk, tv)]
    o_ref, to_ref = kernels.attention_with_tangent(*low, *tlow, backend="reference")

    def grads(fn, ts):
        ts = [t.detach().requires_grad_(True) for t in ts]
        return torch.autograd.grad(fn(*ts).double().sum(), ts)
    g_ref, g64 = grads(_math, low), grads(_math, (q, k, v))
    for fused in (True, False):  # the fused single pass and forward-then-tangent
        o, to = flash.attention_with_tangent(*low, *tlow, fused=fused)
        assert_close_to_ref(o, o_ref, o64, f"O fused={fused}")
        assert_close_to_ref(to, to_ref, to64, f"tO fused={fused}")
        assert not to.requires_grad and to.dtype == dtype
        # Gradients through O, by the tolerance rule against the fp64 reference.
        g = grads(lambda *x, f=fused: flash.attention_with_tangent(*x, *tlow, fused=f)[0], low)
        for a, r, r64, name in zip(g, g_ref, g64, ("dq", "dk", "dv")):
            assert_close_to_ref(a, r, r64, f"{name} fused={fused}")
        # Missing tangents are zeros.
        _, t_none = flash.attention_with_tangent(*low, tlow[0], None, None, fused=fused)
        _, t_zero = flash.attention_with_tangent(*low, tlow[0], torch.zeros_like(tlow[1]),
                                                 torch.zeros_like(tlow[2]), fused=fused)
        torch.testing.assert_close(t_none, t_zero, rtol=0, atol=0)
    _, t_none = kernels.attention_with_tangent(*low, tlow[0], None, None, backend="reference")
    _, t_zero = kernels.attention_with_tangent(*low, tlow[0], torch.zeros_like(tlow[1]), torch.zeros_like(tlow[2]),
                                               backend="reference")
    torch.testing.assert_close(t_none, t_zero, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tangent tk"):
        kernels.attention_with_tangent(*low, None, tlow[1][:, :, :5], None)
