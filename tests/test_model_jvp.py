"""The model's explicit tangent pass (``MFSRTransformer.forward / field(..., tangents=...)``) against
``torch.func.jvp`` of the same call: u identical, du/dt equal within rounding (fp64), parameter gradients through u
equal, on every architecture branch; then the Triton path, and the MeanFlow target in all three modes."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_inputs, micro_model, randomize_

from mfsr_fast import MFSRTransformer
from mfsr_fast.sampling.meanflow import adaptive_loss, meanflow_target

VARIANTS = {  # over the micro model (the tiny preset's x_lr prediction and learned prompts, scaled down)
    "x_lr-learned-prompts": {},
    "v-prediction-given-context": dict(prediction="v", learned_prompts=0),
    "x-prediction": dict(prediction="x"),
    "dit4sr-norm-k-bug": dict(dit4sr_norm_k_bug=True),
    "no-lr-stream": dict(lr_stream=False, prediction="v"),
    "no-context-no-pooled-no-qk-norm": dict(context_dim=0, pooled_dim=0, qk_norm=None, learned_prompts=0),
    "three-blocks-two-dual": dict(num_layers=3, dual_attention_layers=(0, 2)),
    "restorer-and-bicubic-residual": dict(lr_source="both", restorer="r", residual_scale=0.25, prediction="x"),
    "conv-head": dict(lr_source="both", restorer="r", residual_scale=0.25, prediction="x", conv_head=4),
}


def _call(m, inp, tangents=None):
    kw = dict(context=inp["context"], pooled=inp["pooled"])
    if m.cfg.learned_prompts:
        kw = dict(prompt="positive")
    if tangents is None:
        return m.field(inp["z"], inp["lr"], inp["t"], inp["r"], **kw)
    return m.field(inp["z"], inp["lr"], inp["t"], inp["r"], tangents=tangents, **kw)


def _grads(m, u):
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(u.pow(2).sum(), params, allow_unused=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_explicit_tangent_equals_torch_func_jvp_fp64(variant):
    m = micro_model(torch.float64, **VARIANTS[variant]).set_kernel_backend("reference")
    inp = micro_inputs(m)
    # One sample under x_t_min, where the x-parametrisation's clamp has zero derivative in t.
    inp["t"] = torch.tensor([0.7, 0.03], dtype=torch.float64)
    inp["r"] = torch.tensor([0.2, 0.01], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    z, t, r = inp["z"], inp["t"], inp["r"]
    for tangents in [(torch.randn(z.shape, generator=g, dtype=z.dtype), torch.ones_like(t), torch.zeros_like(r)),
                     (torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(2, generator=g, dtype=t.dtype),
                      torch.randn(2, generator=g, dtype=r.dtype))]:
        def fn(z_, t_, r_):
            return _call(m, dict(inp, z=z_, t=t_, r=r_))
        u_ad, du_ad = torch.func.jvp(fn, (z, t, r), tangents)
        u, du = _call(m, inp, tangents)
        assert torch.equal(u, _call(m, inp))  # the same primal ops as without tangents
        # (under torch.func.jvp the reference attention runs as plain math instead of SDPA: rounding differs)
        torch.testing.assert_close(u, u_ad, rtol=1e-12, atol=1e-12 * u_ad.abs().max().item())
        assert u.requires_grad and not du.requires_grad and du.shape == z.shape
        assert du_ad.abs().max() > 1e-3  # not vacuous
        torch.testing.assert_close(du, du_ad, rtol=1e-10, atol=1e-10 * du_ad.abs().max().item())
    # Reverse mode through u equals reverse mode through the plain forward.
    g1, g2 = _grads(m, _call(m, inp, tangents)[0]), _grads(m, _call(m, inp))
    assert sum(a is not None for a in g1) > 10
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * max(b.abs().max().item(), 1.0))


def test_missing_tangents_are_zero_and_bad_tangents_are_clear_errors():
    m = micro_model(torch.float64).set_kernel_backend("reference")
    inp = micro_inputs(m)
    z, t, r = inp["z"], inp["t"], inp["r"]
    tz = torch.randn_like(z)
    _, a = _call(m, inp, (tz, None, None))
    _, b = _call(m, inp, (tz, torch.zeros_like(t), torch.zeros_like(r)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    _, c = _call(m, inp, (None, None, None))
    assert torch.count_nonzero(c) == 0
    with pytest.raises(ValueError, match="tangent of z"):
        _call(m, inp, (tz[:1], None, None))
    with pytest.raises(ValueError, match="tangent of t"):
        _call(m, inp, (tz, torch.ones(3, dtype=t.dtype), None))
    with pytest.raises(ValueError, match="tangents must be a tuple"):
        _call(m, inp, (tz,))


def test_triton_path_explicit_tangent_matches_reference_jvp():
    """fp32, the kernels through the interpreter (compiled on a GPU): u and du/dt and a gradient against
    torch.func.jvp on the reference path."""
    m = randomize_(MFSRTransformer.from_preset("tiny", num_layers=2, dual_attention_layers=(0,)), std=0.1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = m.to(device)
    g = torch.Generator().manual_seed(3)
    z, lr, v = (torch.randn(2, 48, 8, 6, generator=g).to(device) for _ in range(3))
    ctx = torch.randn(2, 4, m.cfg.context_dim, generator=g).to(device)
    t = torch.tensor([0.9, 0.5], device=device)
    r = torch.tensor([0.2, 0.5], device=device)
    out = {}
    for backend, mode in (("triton", "explicit"), ("reference", "jvp")):
        m.set_kernel_backend(backend).zero_grad()
        u, u_tgt = meanflow_target(lambda z_, t_, r_, **kw: m.field(z_, lr, t_, r_, context=ctx, **kw), z, t, r, v,
                                   mode=mode)
        u.pow(2).mean().backward()
        out[backend] = (u.detach(), u_tgt, m.blocks[0].attn.to_q.weight.grad.clone())
    for a, b in zip(out["triton"], out["reference"]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


def test_meanflow_target_three_modes_agree_with_gradients():
    m = randomize_(MFSRTransformer.from_preset("tiny"), std=0.05).set_kernel_backend("reference")
    g = torch.Generator().manual_seed(0)
    z, lr, v = (torch.randn(2, 48, 8, 8, generator=g) for _ in range(3))
    ctx = torch.randn(2, 4, m.cfg.context_dim, generator=g)
    t, r = torch.tensor([0.9, 0.4]), torch.tensor([0.1, 0.4])

    def fn(z_, t_, r_, **kw):
        return m.field(z_, lr, t_, r_, context=ctx, **kw)

    res = {}
    for mode in ("explicit", "jvp", "split"):
        m.zero_grad()
        u, u_tgt = meanflow_target(fn, z, t, r, v, mode=mode)
        assert u.requires_grad and not u_tgt.requires_grad
        adaptive_loss(u, u_tgt).backward()
        res[mode] = (u.detach(), u_tgt, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    scale = res["jvp"][1].abs().max()
    for mode in ("explicit", "split"):
        torch.testing.assert_close(res[mode][0], res["jvp"][0])
        assert (res[mode][1] - res["jvp"][1]).abs().max() <= 1e-5 * scale
        assert res[mode][2].keys() == res["jvp"][2].keys()
        for n, gr in res["jvp"][2].items():
            torch.testing.assert_close(res[mode][2][n], gr, rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(res["explicit"][1][1], v[1])  # r = t: the target is v itself
