"""Triton adaLN kernel (kernels/adaln.py) against the fp64 reference: outputs, every gradient, every tangent.

Runs through the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1) and compiled on a GPU when present.
Tolerance: the rule of conftest.assert_close_to_ref.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_ref

import kernels
from kernels import adaln

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    pytest.param(2, 63, 120, id="B2-L63-D120"),
    pytest.param(3, 37, 200, id="B3-L37-D200"),
    pytest.param(1, 1, 64, id="B1-L1-D64"),
    pytest.param(2, 6, 1536, id="B2-L6-D1536-dit4sr-width"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


pytestmark = pytest.mark.usefixtures("poison")  # conftest: every kernel output starts as NaN


def _inputs(B, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = (torch.randn(B, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    x = x * 2 + 0.5  # non-zero mean, non-unit variance
    shift, scale, gate = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    return [t.to(DEVICE) for t in (x, h, shift, scale, gate)]


def _cast(ts, act, mod):
    x, h, shift, scale, gate = ts
    return x.to(act), h.to(act), shift.to(mod), scale.to(mod), gate.to(mod)


def _fn(backend, res):
    def f(x, h, shift, scale, gate):
        if res:
            return kernels.adaln_modulate(x, shift, scale, gate=gate, h=h, backend=backend)
        return (kernels.adaln_modulate(x, shift, scale, backend=backend),)
    return f


@pytest.mark.parametrize("res", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", DTYPES)
@pytest.mark.parametrize("B,L,D", CASES)
def test_forward(B, L, D, act, res):
    ts = _inputs(B, L, D)
    out = _fn("triton", res)(*_cast(ts, act, act))
    ref = _fn("reference", res)(*_cast(ts, act, act))
    ref64 = _fn("reference", res)(*ts)
    for o, r, r64, name in zip(out, ref, ref64, ("x'", "y") if res else ("y",)):
        assert o.dtype == act and o.shape == (B, L, D)
        assert_close_to_ref(o, r, r64, name)


def test_fp32_modulation_with_bf16_activations():
    ts = _inputs(2, 9, 96)
    out = _fn("triton", True)(*_cast(ts, torch.bfloat16, torch.float32))
    ref = _fn("reference", True)(*_cast(ts, torch.bfloat16, torch.float32))
    ref64 = _fn("reference", True)(*ts)
    for o, r, r64 in zip(out, ref, ref64):
        assert_close_to_ref(o, r, r64)


def _grads(f, ts, cots):
    ts = [t.detach().requires_grad_(True) for t in ts]
    outs = f(*ts)
    return torch.autograd.grad(outs, ts, [c.to(o.dtype) for c, o in zip(cots, outs)], allow_unused=True)


@pytest.mark.parametrize("res", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", DTYPES)
@pytest.mark.parametrize("B,L,D", CASES)
def test_backward(B, L, D, act, res):
    ts = _inputs(B, L, D, seed=1)
    g = torch.Generator().manual_seed(2)
    cots = [torch.randn(B, L, D, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2 if res else 1)]
    got = _grads(_fn("triton", res), _cast(ts, act, act), cots)
    ref = _grads(_fn("reference", res), _cast(ts, act, act), cots)
    ref64 = _grads(_fn("reference", res), ts, cots)
    names = ("dx", "dh", "dshift", "dscale", "dgate")
    for gv, r, r64, name in zip(got, ref, ref64, names):
        if not res and name in ("dh", "dgate"):
            assert gv is None
            continue
        assert gv.dtype == act
        assert_close_to_ref(gv, r, r64, name)


@pytest.mark.parametrize("res", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", DTYPES)
@pytest.mark.parametrize("B,L,D", CASES)
def test_tangent(B, L, D, act, res):
    ts = _inputs(B, L, D, seed=3)
    tans = _inputs(B, L, D, seed=4)
    got = torch.func.jvp(_fn("triton", res), tuple(_cast(ts, act, act)), tuple(_cast(tans, act, act)))
    ref = torch.func.jvp(_fn("reference", res), tuple(_cast(ts, act, act)), tuple(_cast(tans, act, act)))
    ref64 = torch.func.jvp(_fn("reference", res), tuple(ts), tuple(tans))
    for i, name in enumerate(("x'", "y") if res else ("y",)):
        assert_close_to_ref(got[0][i], ref[0][i], ref64[0][i], name)
        assert_close_to_ref(got[1][i], ref[1][i], ref64[1][i], "tangent " + name)


def test_tangent_with_partial_tangents_and_modulation_depending_on_time():
    """MeanFlow's case: x has a tangent, the modulation depends on t (tangent), h has none."""
    ts = _inputs(2, 11, 72, seed=5)
    x, h, shift, scale, gate = ts
    w = torch.randn(3, 72, dtype=torch.float64, device=DEVICE)

    def f(backend):
        def g(x_, t_):
            mod = torch.sin(t_[:, None, None] * w[None] * 3).unbind(1)  # 3 x (B, 72), functions of t
            return kernels.adaln_modulate(x_, mod[0], mod[1], gate=mod[2], h=h, backend=backend)
        return g

    t = torch.tensor([0.3, 0.8], dtype=torch.float64, device=DEVICE)
    tx = torch.randn_like(x)
    got = torch.func.jvp(f("triton"), (x.float(), t.float()), (tx.float(), torch.ones_like(t).float()))
    ref = torch.func.jvp(f("reference"), (x.float(), t.float()), (tx.float(), torch.ones_like(t).float()))
    ref64 = torch.func.jvp(f("reference"), (x, t), (tx, torch.ones_like(t)))
    for i in range(2):
        assert_close_to_ref(got[1][i], ref[1][i], ref64[1][i], f"tangent {i}")


def test_primal_of_the_tangent_pass_backpropagates_to_parameters():
    """One torch.func.jvp gives u with grad (parameters require grad) and a detached tangent, as MeanFlow needs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 3 * 40).to(DEVICE)
    x = torch.randn(2, 9, 40, device=DEVICE)
    h = torch.randn(2, 9, 40, device=DEVICE)
    temb = torch.randn(2, 16, device=DEVICE)

    def model(backend):
        def f(x_, temb_):
            shift, scale, gate = lin(temb_).chunk(3, dim=1)
            xo, y = kernels.adaln_modulate(x_, shift, scale, gate=gate, h=h, backend=backend)
            return (xo * y).sum(-1)
        return f

    grads = []
    for backend in ("triton", "reference"):
        lin.zero_grad()
        out, tan = torch.func.jvp(model(backend), (x, temb), (torch.ones_like(x), torch.ones_like(temb)))
        assert out.requires_grad
        out.pow(2).sum().backward(retain_graph=True)
        if backend == "triton" and tan.requires_grad:
            with pytest.raises(RuntimeError):
                tan.sum().backward()
        grads.append([p.grad.clone() for p in lin.parameters()] + [tan])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_torch_compile_keeps_outputs_and_the_custom_tangent():
    """Compiled forward matches eager; a compiled torch.func.jvp keeps the kernel's tangent (Dynamo would drop a custom
    jvp traced inside the compiled region, so the kernel path runs as a graph break)."""
    x, h, shift, scale, gate = (t.float() for t in _inputs(2, 5, 48))
    tx = torch.randn_like(x)

    def f(x_):
        xo, y = kernels.adaln_modulate(x_, shift, scale, gate=gate, h=h, backend="triton")
        return xo + y

    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x), f(x))
    jvp_c = torch.compile(lambda a, ta: torch.func.jvp(f, (a,), (ta,)), backend="aot_eager")
    _, t_c = jvp_c(x, tx)
    _, t_e = torch.func.jvp(f, (x,), (tx,))
    torch.testing.assert_close(t_c, t_e)
    # The op itself traces (fake implementation) for torch.compile's own graphs.
    y_op = torch.compile(lambda a: torch.ops.mfsr.adaln_fwd(a, shift, scale, gate, h, 1e-6)[0], fullgraph=True,
                         backend="aot_eager")(x)
    torch.testing.assert_close(y_op, f(x) - (x + gate[:, None] * h))


def test_triton_backend_rejects_bad_input_clearly():
    x = torch.randn(2, 3, 8, device=DEVICE)
    s = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shift"):
        kernels.adaln_modulate(x, torch.randn(2, 9, device=DEVICE), s, backend="triton")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        kernels.adaln_modulate(x.double(), s.double(), s.double(), backend="triton")
    with pytest.raises(ValueError, match="limit"):
        big = torch.randn(1, 1, adaln.MAX_D + 1, device=DEVICE)
        kernels.adaln_modulate(big, big[:, 0], big[:, 0], backend="triton")


def test_model_forward_and_tangent_pass_with_triton_adaln_match_reference(monkeypatch):
    pytest.importorskip("diffusers")
    from conftest import micro_inputs, micro_model
    m = micro_model().to(DEVICE)
    inp = {k: (v.to(DEVICE) if v is not None else None) for k, v in micro_inputs(m).items()}
    v = torch.randn_like(inp["z"])

    def run(backend):
        m.set_kernel_backend(backend)
        fn = lambda z, t, r: m(z, inp["lr"], t, r, context=inp["context"], pooled=inp["pooled"])  # noqa: E731
        with torch.no_grad():
            return torch.func.jvp(fn, (inp["z"], inp["t"], inp["r"]),
                                  (v, torch.ones_like(inp["t"]), torch.zeros_like(inp["r"])))

    # The micro model's head dim (8) is not a Triton attention size: route only adaLN through Triton.
    orig = kernels.attention
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "attention", lambda q, k, v_, **kw: orig(q, k, v_, scale=kw.get("scale"),
                                                                      backend="reference"))
        out_t = run("triton")
    out_r = run("reference")
    for a, b in zip(out_t, out_r):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-5 * scale


def test_inference_calls_skip_the_autograd_function(monkeypatch):
    """Without gradients or tangents the launcher runs directly (no Function overhead), with the same result."""
    ts = _cast(_inputs(2, 5, 64), torch.float32, torch.float32)
    with_fn = _fn("triton", True)(*ts)
    ts[0].requires_grad_(True)
    monkeypatch.setattr(adaln.AdaLNModulate, "apply", lambda *a: pytest.fail("Function used under no_grad"))
    with torch.no_grad():
        direct = _fn("triton", True)(*ts)
    for a, b in zip(with_fn, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(pytest.fail.Exception):
        _fn("triton", True)(*ts)  # gradients recorded: the Function is required


@pytest.mark.parametrize("res", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", DTYPES)
def test_explicit_tangent_entry_point(act, res):
    """``adaln_modulate_with_tangent`` (the model's explicit JVP pass): outputs as ``adaln_modulate`` and
    differentiable, tangents as torch.func.jvp of the fp64 reference, detached; None tangents are zeros."""
    B, L, D = 2, 9, 120
    ts = _inputs(B, L, D, seed=6)
    tans = _inputs(B, L, D, seed=7)
    _, ref64 = torch.func.jvp(_fn("reference", res), tuple(ts), tuple(tans))

    def call(backend, vals, tv):
        x, h, shift, scale, gate = vals
        tx, th, tshift, tscale, tgate = tv
        if res:
            return kernels.adaln_modulate_with_tangent(x, shift, scale, gate=gate, h=h, tx=tx, tshift=tshift,
                                                       tscale=tscale, tgate=tgate, th=th, backend=backend)
        out, tan = kernels.adaln_modulate_with_tangent(x, shift, scale, tx=tx, tshift=tshift, tscale=tscale,
                                                       backend=backend)
        return (out,), (tan,)

    low, tlow = _cast(ts, act, act), _cast(tans, act, act)
    got_out, got_tan = call("triton", low, tlow)
    ref_out, ref_tan = call("reference", low, tlow)
    for i, name in enumerate(("x'", "y") if res else ("y",)):
        assert_close_to_ref(got_out[i], ref_out[i], _fn("reference", res)(*ts)[i], name)
        assert_close_to_ref(got_tan[i], ref_tan[i], ref64[i], "tangent " + name)
        assert not got_tan[i].requires_grad and got_tan[i].dtype == act
    # Gradients through the outputs equal those of adaln_modulate.
    leaves = [t.detach().requires_grad_(True) for t in low]
    out, _ = call("triton", leaves, tlow)
    g1 = torch.autograd.grad(sum(o.float().sum() for o in out), leaves, allow_unused=True)
    leaves2 = [t.detach().requires_grad_(True) for t in low]
    x, h, shift, scale, gate = leaves2
    out2 = (kernels.adaln_modulate(x, shift, scale, gate=gate, h=h, backend="triton") if res
            else (kernels.adaln_modulate(x, shift, scale, backend="triton"),))
    g2 = torch.autograd.grad(sum(o.float().sum() for o in out2), leaves2, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Only the modulation has tangents (the first block's context stream): tx, th None are zeros.
    zero = [torch.zeros_like(t) for t in tlow]
    part = [None, None, tlow[2], tlow[3], tlow[4] if res else None]
    for backend in ("triton", "reference"):
        _, t_none = call(backend, low, part)
        _, t_zero = call(backend, low, [zero[0], zero[1], tlow[2], tlow[3], tlow[4] if res else None])
        for a, b in zip(t_none, t_zero):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
