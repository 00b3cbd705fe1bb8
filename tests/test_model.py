"""MFSRTransformer: presets, save/load, kernel routing, initialisation, input validation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import micro_inputs, micro_model

import kernels
from mfsr_fast import PRESETS, MFSRTransformer
from mfsr_fast.models.tangent import Dual


def test_presets_build_and_run_on_cpu():
    for name in ("tiny", "small"):
        m = MFSRTransformer.from_preset(name).eval()
        z = torch.randn(1, m.cfg.in_channels, 8, 8)
        with torch.no_grad():
            u = m(z, torch.randn_like(z), torch.tensor([0.7]), torch.tensor([0.2]),
                  context=torch.randn(1, 4, m.cfg.context_dim), pooled=torch.randn(1, m.cfg.pooled_dim))
        assert u.shape == z.shape and torch.isfinite(u).all()
    assert set(PRESETS) >= {"dit4sr", "small", "tiny"}


def test_dit4sr_preset_has_sd35_medium_sizes():
    """Built on the meta device: same parameter count as diffusers' SD3.5-medium transformer plus our additions."""
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        m = MFSRTransformer.from_preset("dit4sr", lr_stream=False)
        sd35 = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                     caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                     pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                     qk_norm="rms_norm")
        full = MFSRTransformer.from_preset("dit4sr")
    n_sd35 = sum(p.numel() for p in sd35.parameters())
    n_h = sum(p.numel() for p in m.h_embed.parameters())
    # The last block's context query projection and norm are dead weights in SD3 (its context output is dropped).
    last = sd35.transformer_blocks[-1].attn
    n_dead = sum(p.numel() for p in (*last.add_q_proj.parameters(), *last.norm_added_q.parameters()))
    assert sum(p.numel() for p in m.parameters()) == n_sd35 - n_dead + n_h
    assert 2.2e9 < n_sd35 < 2.6e9
    # DiT4SR LR stream: 4 D x D linears per attention (24 joint + 13 dual) and one depthwise conv per block.
    D = 1536
    n_lr = (24 + 13) * 4 * (D * D + D) + 24 * (4 * D * 9 + 4 * D)
    assert sum(p.numel() for p in full.parameters()) == n_sd35 - n_dead + n_h + n_lr


def test_from_preset_rejects_unknown():
    with pytest.raises(ValueError, match="unknown preset"):
        MFSRTransformer.from_preset("huge")
    with pytest.raises(ValueError, match="unknown config keys"):
        MFSRTransformer.from_preset("tiny", depth=3)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MFSRTransformer.from_preset("tiny", num_layers=2, dual_attention_layers=(5,))


def test_save_load_roundtrip_is_safetensors_and_exact(tmp_path):
    m = micro_model()
    m.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "config.json" in files and "diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dual_attention_layers"] == [0] and cfg["in_channels"] == 4
    m2 = MFSRTransformer.from_pretrained(tmp_path)
    assert m2.cfg == m.cfg
    inp = micro_inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(m2(**inp), m(**inp), rtol=0, atol=0)


@pytest.mark.parametrize("layers, dual, extra, want", [
    (2, (0,), 2, (0, 1, 2)),  # the copied block (the one before the last) is dual: so are its copies
    (3, (0, 2), 1, (0, 3)),  # a plain copy; the dual last block moves behind it
    (1, (), 2, ()),  # one block: copies of the last one's weights, fresh context-stream output parts
])
def test_grown_model_computes_the_same_function_and_tangent_and_saves(tmp_path, layers, dual, extra, want):
    """MFSRTransformer.grown inserts zero-gated copies of the block before the last: the same u and du/dt to the bit
    (fp64, random weights, context and LR stream), a deeper config that saves and loads, and the new blocks learn."""
    m = micro_model(torch.float64, num_layers=layers, dual_attention_layers=dual)
    m.set_kernel_backend("reference")
    g = m.grown(extra)
    assert g.kernel_backend == "reference"
    assert g.cfg.num_layers == layers + extra and g.cfg.dual_attention_layers == want
    assert g.dtype == torch.float64 and len(g.blocks) == layers + extra and g.blocks[-1].last
    inp = micro_inputs(m)
    tangents = (torch.randn_like(inp["z"]), torch.ones_like(inp["t"]), torch.zeros_like(inp["r"]))
    u, du = m(**inp, tangents=tangents)
    u2, du2 = g(**inp, tangents=tangents)
    assert torch.equal(u, u2) and torch.equal(du, du2)
    u2.square().sum().backward()  # the zero gates get gradients: the copies start learning at once
    assert g.blocks[layers - 1].norm1.weight.grad.abs().sum() > 0
    g.save_pretrained(tmp_path)
    g2 = MFSRTransformer.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert g2.cfg == g.cfg and all(torch.equal(a, b) for a, b in zip(g.state_dict().values(),
                                                                     g2.state_dict().values()))
    with torch.no_grad():  # (loaded tensors may take another fp64 summation order: the last bits can move)
        torch.testing.assert_close(g2(**inp), u.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(m.grown(0)(**inp), u.detach())
    with pytest.raises(ValueError, match=">= 0"):
        m.grown(-1)


def test_every_attention_and_modulation_goes_through_kernels(monkeypatch):
    calls = {"attention": [], "adaln": []}
    real_attn, real_adaln = kernels.attention, kernels.adaln_modulate

    def attn(q, k, v, **kw):
        calls["attention"].append((q.shape, kw.get("backend")))
        return real_attn(q, k, v, **kw)

    def adaln(x, *a, **kw):
        calls["adaln"].append(kw.get("backend"))
        return real_adaln(x, *a, **kw)

    monkeypatch.setattr(kernels, "attention", attn)
    monkeypatch.setattr(kernels, "adaln_modulate", adaln)
    m = micro_model(num_layers=3, dual_attention_layers=(0, 2)).set_kernel_backend("reference")
    inp = micro_inputs(m, H=8, W=6, Lc=3)
    with torch.no_grad():
        m(**inp)
    # Joint attention in each block + image-only attention in the dual blocks, over [z; lr; context] tokens.
    assert len(calls["attention"]) == 3 + 2
    n = (8 // 2) * (6 // 2)
    assert calls["attention"][0][0][2] == 2 * n + 3
    # Per block: attn (+attn2) modulation, gated-residual MLP modulation, context attn and MLP (not in the last
    # block, which only has its attention modulation); then the output modulation.
    expected = (2 + 1 + 2) + (1 + 1 + 2) + (2 + 1 + 1) + 1
    assert len(calls["adaln"]) == expected
    assert {b for _, b in calls["attention"]} == {"reference"} and set(calls["adaln"]) == {"reference"}


def test_h_embedder_starts_at_zero_so_student_equals_teacher_at_r_equals_t():
    m = MFSRTransformer.from_preset("tiny", num_layers=2, dual_attention_layers=(0,))
    assert torch.count_nonzero(m.h_embed.linear_2.weight) == 0
    from conftest import randomize_
    randomize_(m)
    torch.nn.init.zeros_(m.h_embed.linear_2.weight)
    inp = micro_inputs(m)
    with torch.no_grad():
        u_r = m(**inp)
        u_t = m(**{**inp, "r": inp["t"]})
        m.h_embed.linear_2.weight.normal_()
        u_r2 = m(**inp)
    # With the zero layer, h = t - r only enters through the bias path, which is the same for every h.
    torch.testing.assert_close(u_r, u_t)
    assert not torch.allclose(u_r2, u_t)


def test_dit4sr_lr_stream_initialisation():
    m = MFSRTransformer.from_preset("tiny", num_layers=2, dual_attention_layers=(0,))
    for blk in m.blocks:
        for attn in (blk.attn, blk.attn2):
            if attn is None:
                continue
            for lin in (attn.to_q_control, attn.to_k_control, attn.to_v_control):
                assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
            torch.testing.assert_close(attn.to_out_control.weight, attn.to_out.weight)
        assert torch.count_nonzero(blk.ff.control_conv.weight) == 0
        assert torch.count_nonzero(blk.norm1.weight) == 0  # adaLN-Zero
    assert torch.count_nonzero(m.proj_out.weight) == 0


def test_lr_and_context_change_the_output():
    m = micro_model()
    inp = micro_inputs(m)
    with torch.no_grad():
        base = m(**inp)
        assert not torch.allclose(base, m(**{**inp, "lr": inp["lr"] + 1}))
        assert not torch.allclose(base, m(**{**inp, "context": inp["context"] + 1}))
        assert not torch.allclose(base, m(**{**inp, "r": inp["r"] * 0.5}))
        no_ctx = m(**{**inp, "context": None, "pooled": None})
    assert torch.isfinite(no_ctx).all()


def test_fp64_and_bf16_forward():
    for dtype in (torch.float64, torch.bfloat16):
        m = micro_model(dtype=dtype)
        inp = micro_inputs(m)
        with torch.no_grad():
            u = m(**inp)
        assert u.dtype == dtype and torch.isfinite(u).all()


def test_square_and_nonsquare_grids_with_lr_conv():
    m = micro_model()
    for H, W in ((4, 4), (8, 12), (2, 10)):
        inp = micro_inputs(m, H=H, W=W)
        with torch.no_grad():
            assert m(**inp).shape == inp["z"].shape


@pytest.mark.parametrize("change,match", [
    (dict(lr="small"), "lr spatial size"),
    (dict(z="odd"), "divisible by the patch size"),
    (dict(r="bigger"), "r must be <= t"),
    (dict(t="above1"), r"t must lie in \[0, 1\]"),
    (dict(t="negative"), r"t must lie in \[0, 1\]"),
    (dict(z="fp64"), "dtype"),
    (dict(lr="fp64"), "must match z"),
    (dict(z="3d"), r"\(B, C, H, W\)"),
    (dict(z="channels"), "channels"),
    (dict(t="shape"), r"shape \(B,\)"),
    (dict(t="int"), "floating-point"),
    (dict(lr="none"), "LR stream"),
    (dict(context="width"), "context must be"),
    (dict(pooled="width"), "pooled must be"),
    (dict(z="device"), "meta|device|dtype"),
], ids=lambda x: str(x) if isinstance(x, str) else None)
def test_bad_input_is_a_clear_value_error(change, match):
    m = micro_model()
    inp = micro_inputs(m)
    key, what = next(iter(change.items()))
    v = inp[key]
    if what == "small":
        v = v[:, :, :4]
    elif what == "odd":
        v, inp["lr"] = v[:, :, :7], inp["lr"][:, :, :7]
    elif what == "bigger":
        v = inp["t"] + 0.05
    elif what == "above1":
        v = v + 1.0
    elif what == "negative":
        v = v - 1.0
    elif what == "fp64":
        v = v.double()
    elif what == "3d":
        v = v[0]
    elif what == "channels":
        v, inp["lr"] = v[:, :3], inp["lr"][:, :3]
    elif what == "shape":
        v = torch.cat([v, v])
    elif what == "int":
        v = torch.ones(2, dtype=torch.long)
    elif what == "none":
        v = None
    elif what == "width":
        v = torch.cat([v, v], dim=-1)
    elif what == "device":
        v, inp["lr"] = v.to("meta"), inp["lr"].to("meta")
    inp[key] = v
    with pytest.raises(ValueError, match=match):
        m(**inp)


def test_model_without_lr_stream_refuses_lr():
    m = micro_model(lr_stream=False)
    inp = micro_inputs(m)
    with pytest.raises(ValueError, match="no LR stream"):
        m(**{**inp, "lr": inp["z"]})
    with torch.no_grad():
        assert m(**inp).shape == inp["z"].shape


@pytest.mark.parametrize("prediction", ["v", "x", "x_lr"])
def test_field_parametrisations_and_learned_prompts(prediction):
    from conftest import randomize_

    m = randomize_(MFSRTransformer.from_preset("tiny", num_layers=1, num_heads=2, head_dim=16,
                                               dual_attention_layers=(0,), prediction=prediction), std=0.1)
    g = torch.Generator().manual_seed(0)
    z, lr = (torch.randn(2, 48, 4, 6, generator=g) for _ in range(2))
    t, r = torch.tensor([1.0, 0.02]), torch.tensor([0.0, 0.01])
    ctx, pooled = m.prompt("positive", 2)
    assert ctx.shape == (2, 4, 128) and pooled.shape == (2, 128)
    idx_ctx, _ = m.prompt(torch.tensor([0, 2]))
    assert torch.equal(idx_ctx[0], ctx[0]) and not torch.equal(idx_ctx[1], ctx[1])
    out = m(z, lr, t, r, ctx, pooled)
    u = m.field(z, lr, t, r, ctx, pooled)
    if prediction == "v":
        expect = out
    else:
        x = out + lr if prediction == "x_lr" else out
        expect = (z - x) / t.clamp_min(m.cfg.x_t_min).view(-1, 1, 1, 1)
    torch.testing.assert_close(u, expect)
    if prediction != "v":  # one step from t = 1 to r = 0 lands on the predicted clean image
        torch.testing.assert_close((z - u)[0], (out + lr if prediction == "x_lr" else out)[0])
    with pytest.raises(ValueError, match="unknown prompt"):
        m.prompt("sharp")
    with pytest.raises(ValueError, match="no learned prompts"):
        bare = MFSRTransformer.from_preset("tiny", num_layers=1, dual_attention_layers=(), learned_prompts=0)
        bare.prompt("positive")


def test_conv_head_starts_as_the_linear_read_out_and_sees_across_patches():
    """conv_head > 0: at init (second conv zero) the output is the linear read-out's first C channels; trained (here:
    random) it mixes neighbouring patches, which a per-token read-out cannot; a config without the field has none."""
    torch.manual_seed(0)
    m = micro_model(conv_head=3)
    C = m.cfg.in_channels
    assert m.proj_out.out_features == m.cfg.patch_size ** 2 * (C + 3)
    o = torch.randn(2, C + 3, 8, 6)
    torch.nn.init.zeros_(m.head_conv2.weight)
    torch.nn.init.zeros_(m.head_conv2.bias)
    assert torch.equal(m._conv_head(Dual(o)).p, o[:, :C])
    fresh = MFSRTransformer.from_preset("tiny-r")
    assert fresh.cfg.conv_head > 0 and not fresh.head_conv2.weight.any()
    # Random head: one read-out pixel changed at a patch's last row/column moves output pixels in the next patch.
    torch.nn.init.normal_(m.head_conv2.weight, std=0.3)
    o2 = o.clone()
    o2[:, :, 1, 1] += 1.0  # patch (0, 0) of a 2 x 2 patch grid
    with torch.no_grad():
        d = (m._conv_head(Dual(o2)).p - m._conv_head(Dual(o)).p).abs().sum(dim=(0, 1))
    assert d[2, 2] > 0 and d[1, 3] > 0 and d[3, 3] > 0  # neighbours across the patch edges
    assert d[4, 4] == 0 and d[1, 4] == 0 and d[4, 0] == 0  # two 3 x 3 convolutions reach 2 pixels
    with pytest.raises(ValueError, match="conv_head"):
        micro_model(conv_head=-1)
    # Models saved before the field existed (the dit4sr path, older runs) load with the plain read-out.
    plain = micro_model()
    assert plain.cfg.conv_head == 0 and plain.head_conv1 is None and plain.head_conv2 is None


@pytest.mark.parametrize("bug", [False, True], ids=["own-lr-keys", "released-dit4sr"])
def test_lr_stream_attention_against_explicit_formula(bug):
    """One joint attention with the LR stream, written out with SDPA: image queries/keys/values, LR ones through the
    control projections after the shared ones (or, as the released DiT4SR code, LR keys = norm_k(norm_k(image
    keys))), context ones, QK RMSNorm with non-unit weights, the LR residual, separate output projections."""
    import torch.nn.functional as F

    from mfsr_fast.models.transformer import Attention, MFSRConfig

    torch.manual_seed(0)
    cfg = MFSRConfig(num_heads=2, head_dim=8, context_dim=16, dit4sr_norm_k_bug=bug)
    attn = Attention(cfg, context=True, context_out=True).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == 8 else 0.0))
    B, N, Lc, D = 2, 6, 3, 16
    x = torch.randn(B, 2 * N, D, dtype=torch.float64)
    c = torch.randn(B, Lc, D, dtype=torch.float64)
    out, out_c = (d.p for d in attn(Dual(x), N, Dual(c), backend="reference"))

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.eps) * w

    def heads(t):
        return t.unflatten(-1, (2, 8)).transpose(1, 2)

    xi, xl = x[:, :N], x[:, N:]
    q = heads(attn.to_q(xi))
    k = rms(heads(attn.to_k(xi)), attn.norm_k.weight)
    ql = heads(attn.to_q_control(attn.to_q(xl)))
    kl = rms(k, attn.norm_k.weight) if bug else rms(heads(attn.to_k_control(attn.to_k(xl))), attn.norm_k.weight)
    vl = heads(attn.to_v_control(attn.to_v(xl)))
    qc, kc, vc = heads(attn.add_q_proj(c)), heads(attn.add_k_proj(c)), heads(attn.add_v_proj(c))
    Q = torch.cat([rms(q, attn.norm_q.weight), rms(ql, attn.norm_q.weight), rms(qc, attn.norm_added_q.weight)], 2)
    K = torch.cat([k, kl, rms(kc, attn.norm_added_k.weight)], 2)
    V = torch.cat([heads(attn.to_v(xi)), vl, vc], 2)
    o = F.scaled_dot_product_attention(Q, K, V).transpose(1, 2).flatten(2)
    ref = torch.cat([attn.to_out(o[:, :N]), attn.to_out_control(o[:, N:2 * N] + xl)], 1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_c, attn.to_add_out(o[:, 2 * N:]))
