"""Real-checkpoint loading (issue 7) with tiny random checkpoints written by diffusers' own save_pretrained: plain
SD3.5 transformers, DiT4SR-format ones (the SD3 keys plus synthetic control weights), broken ones."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from mfsr_fast.convert import load_transformer, read_checkpoint

DUAL = (0, 1)
HID = 4 * 32  # feed-forward width of the tiny config


def _sd35(seed=0, channels=4):
    torch.manual_seed(seed)
    sd3 = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=channels, num_layers=3, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=12, caption_projection_dim=32,
                                pooled_projection_dim=10, out_channels=channels, pos_embed_max_size=24,
                                dual_attention_layers=DUAL, qk_norm="rms_norm").eval()
    with torch.no_grad():  # diffusers' init leaves norms at 1 and gates at 0: perturb everything
        for name, p in sd3.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if "norm_" in name else 0.0))
    return sd3


def _dit4sr_extra(sd3, seed=1) -> dict[str, torch.Tensor]:
    """The tensors a DiT4SR checkpoint adds to an SD3.5 one, random (non-zero, so each one matters), plus the
    unused context projections DiT4SR's second attentions carry."""
    g = torch.Generator().manual_seed(seed)
    dim = 32
    out = {}
    for i in range(sd3.config.num_layers):
        attns = ["attn", "attn2"] if i in DUAL else ["attn"]
        for a in attns:
            for name in ("to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                out[f"transformer_blocks.{i}.{a}.{name}.weight"] = torch.randn(dim, dim, generator=g) * 0.2
                out[f"transformer_blocks.{i}.{a}.{name}.bias"] = torch.randn(dim, generator=g) * 0.2
        if i in DUAL:
            for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                out[f"transformer_blocks.{i}.attn2.{name}.weight"] = torch.randn(dim, dim, generator=g)
                out[f"transformer_blocks.{i}.attn2.{name}.bias"] = torch.randn(dim, generator=g)
            for name in ("norm_added_q", "norm_added_k"):
                out[f"transformer_blocks.{i}.attn2.{name}.weight"] = torch.randn(8, generator=g)
        out[f"transformer_blocks.{i}.ff.control_conv.weight"] = torch.randn(HID, 1, 3, 3, generator=g) * 0.2
        out[f"transformer_blocks.{i}.ff.control_conv.bias"] = torch.randn(HID, generator=g) * 0.2
    return out


def _write_dit4sr(tmp_path, edit=None, channels=4):
    sd3 = _sd35(channels=channels)
    folder = tmp_path / "dit4sr"
    sd3.save_pretrained(folder)
    f = folder / "diffusion_pytorch_model.safetensors"
    sd = {**load_file(f), **_dit4sr_extra(sd3)}
    if edit:
        edit(sd)
    save_file(sd, f)
    return folder, sd3


def dit4sr_kit(tmp_path):
    """What the real recipe needs, at toy size: a DiT4SR-format teacher in 16-channel latents, an SD3-style VAE and
    a prompt file (positive, negative). Returns their paths (teacher folder, VAE folder, prompt file) as strings."""
    from test_codec import _tiny_vae

    from mfsr_fast.prompts import save_prompts

    folder, _ = _write_dit4sr(tmp_path, channels=16)
    _tiny_vae().save_pretrained(tmp_path / "vae")
    g = torch.Generator().manual_seed(0)
    save_prompts(str(tmp_path / "p.safetensors"), {n: (torch.randn(5, 12, generator=g), torch.randn(10, generator=g))
                                                   for n in ("positive", "negative")})
    return str(folder), str(tmp_path / "vae"), str(tmp_path / "p.safetensors")


def _inputs(seed=2, B=2, size=(8, 12)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, *size, generator=g)
    return (z, torch.randn(B, 4, *size, generator=g), torch.rand(B, generator=g), torch.randn(B, 5, 12, generator=g),
            torch.randn(B, 10, generator=g))


def test_dit4sr_folder_loads_strictly_every_key_matters(tmp_path):
    folder, _ = _write_dit4sr(tmp_path)
    model, report = load_transformer(folder)
    assert report.format == "dit4sr" and model.cfg.lr_stream and model.cfg.dit4sr_norm_k_bug
    assert report.fresh and all(k.startswith("h_embed.") for k in report.fresh)
    assert len(report.skipped) == 2 * 10  # two dual blocks x (4 projections x 2 + 2 norms)
    assert "dit4sr" in str(report) and "dit4sr_norm_k_bug=True" in str(report)
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(model.blocks[1].attn2.to_v_control.weight, sd["transformer_blocks.1.attn2.to_v_control"
                                                                               ".weight"])
    torch.testing.assert_close(model.blocks[2].ff.control_conv.bias, sd["transformer_blocks.2.ff.control_conv.bias"])
    z, lr, t, ctx, pooled = _inputs()
    with torch.no_grad():
        ref = model(z, lr, t, t, ctx, pooled)
        for name, p in model.named_parameters():
            if name.startswith("h_embed."):
                continue
            saved = p.clone()
            p.add_(0.05 * torch.randn_like(p) + 0.05)
            out = model(z, lr, t, t, ctx, pooled)
            p.copy_(saved)
            # The released code's LR keys come from the image keys: its to_k_control has no effect.
            if "to_k_control" in name:
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
            else:
                assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6), f"{name} has no effect"


def test_dit4sr_norm_k_flag_off_uses_the_control_keys(tmp_path):
    folder, _ = _write_dit4sr(tmp_path)
    on, _ = load_transformer(folder)
    off, report = load_transformer(folder, dit4sr_norm_k_bug=False)
    assert not report.dit4sr_norm_k_bug
    z, lr, t, ctx, pooled = _inputs()
    with torch.no_grad():
        a, b = on(z, lr, t, t, ctx, pooled), off(z, lr, t, t, ctx, pooled)
    assert not torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dit4sr_with_identity_control_equals_fresh_lr_stream(tmp_path):
    """DiT4SR at its own initialisation (zero control q/k/v and conv, output projection copied) is exactly what a
    plain SD3.5 folder loads as: two routes through the converter agree."""
    def zero_init(sd):
        for k in list(sd):
            if "_control" in k and "to_out_control" not in k or "control_conv" in k:
                sd[k] = torch.zeros_like(sd[k])
            elif "to_out_control" in k:
                sd[k] = sd[k.replace("to_out_control", "to_out.0")].clone()

    folder, sd3 = _write_dit4sr(tmp_path, zero_init)
    plain = tmp_path / "sd35"
    sd3.save_pretrained(plain)
    a, ra = load_transformer(folder, dit4sr_norm_k_bug=False)
    b, rb = load_transformer(plain)
    assert (ra.format, rb.format) == ("dit4sr", "sd3")
    assert any("to_q_control" in k for k in rb.fresh) and not any("to_q_control" in k for k in ra.fresh)
    z, lr, t, ctx, pooled = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(z, lr, t, t, ctx, pooled), b(z, lr, t, t, ctx, pooled), rtol=1e-5, atol=1e-5)


def test_plain_sd3_without_lr_stream_matches_diffusers(tmp_path):
    sd3 = _sd35()
    sd3.save_pretrained(tmp_path / "sd35")
    model, report = load_transformer(tmp_path / "sd35", lr_stream=False)
    assert report.format == "sd3" and not model.cfg.lr_stream
    z, _, t, ctx, pooled = _inputs()
    with torch.no_grad():
        ref = sd3(z, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t * 1000).sample
        out = model(z, None, t, t, ctx, pooled)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("breakage,match", [
    ("drop", r"(?s)missing keys \(1\).*blocks\.1\.attn\.to_q_control\.weight"),
    ("extra", r"(?s)unexpected keys \(1\).*blocks\.0\.attn\.bogus\.weight"),
    ("shape", r"(?s)shape mismatches \(1\).*blocks\.2\.ff\.control_conv\.weight"),
], ids=["missing", "unexpected", "shape"])
def test_broken_dit4sr_checkpoint_reports_keys(tmp_path, breakage, match):
    def edit(sd):
        if breakage == "drop":
            del sd["transformer_blocks.1.attn.to_q_control.weight"]
        elif breakage == "extra":
            sd["transformer_blocks.0.attn.bogus.weight"] = torch.zeros(3)
        else:
            sd["transformer_blocks.2.ff.control_conv.weight"] = torch.zeros(HID, 1, 5, 5)

    folder, _ = _write_dit4sr(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load_transformer(folder)


def test_save_load_roundtrip_and_dtype(tmp_path):
    folder, _ = _write_dit4sr(tmp_path)
    model, _ = load_transformer(folder, lr_conv_scale=1.0)
    model.save_pretrained(tmp_path / "ours")
    again, report = load_transformer(tmp_path / "ours")
    assert report.format == "mfsr" and again.cfg == model.cfg and again.cfg.lr_conv_scale == 1.0
    z, lr, t, ctx, pooled = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(z, lr, t, t, ctx, pooled), model(z, lr, t, t, ctx, pooled), rtol=0, atol=0)
    half, _ = load_transformer(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_sharded_and_bad_folders(tmp_path):
    sd3 = _sd35()
    sd3.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    cfg, sd = read_checkpoint(tmp_path / "sharded")
    assert cfg["num_layers"] == 3 and sd.keys() == sd3.state_dict().keys()
    with pytest.raises(ValueError, match="no such folder"):
        load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_transformer(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(dict(sd3.config)))
    with pytest.raises(ValueError, match="no weights"):
        load_transformer(tmp_path / "noweights")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "other" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="neither an MFSRTransformer nor an SD3"):
        load_transformer(tmp_path / "other")


def test_bin_checkpoint_refuses_pickled_code(tmp_path):
    sd3 = _sd35()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(sd3.config)))
    torch.save(sd3.state_dict(), folder / "diffusion_pytorch_model.bin")
    model, report = load_transformer(folder)
    assert report.format == "sd3"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        load_transformer(folder)


# upscale() with a folder that holds a student and its VAE.


def _vae_student_folder(tmp_path, with_vae=True):
    from conftest import randomize_
    from test_codec import _tiny_vae

    from mfsr_fast.model import MFSRTransformer

    torch.manual_seed(0)
    m = MFSRTransformer(in_channels=16, patch_size=2, num_layers=1, num_heads=2, head_dim=16, context_dim=24,
                        pooled_dim=8, sample_size=16, pos_embed_max_size=64, dual_attention_layers=(0,),
                        codec="sd3-vae", prediction="v")
    randomize_(m, std=0.05)
    g = torch.Generator().manual_seed(3)
    m.set_prompts(torch.randn(3, 5, 24, generator=g), torch.randn(3, 8, generator=g))
    folder = tmp_path / "student"
    m.save_pretrained(folder / "transformer")
    if with_vae:
        _tiny_vae().save_pretrained(folder / "vae")
    return folder


def test_upscale_through_the_vae_codec(tmp_path):
    import numpy as np

    from mfsr_fast.inference import load_model, upscale, upscale_rgb

    folder = _vae_student_folder(tmp_path)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (18, 23, 3), dtype=np.uint8)  # odd sizes: padded to multiples of 4
    out = upscale(img, model=str(folder))
    assert out.shape == (72, 92, 3) and out.dtype == np.uint8 and out.std() > 0
    np.testing.assert_array_equal(upscale(img, model=str(folder)), out)  # deterministic for a seed
    assert not np.array_equal(upscale(img, model=str(folder), seed=1), out)
    two = upscale(img, model=str(folder), steps=2)
    assert two.shape == out.shape
    # Tiled in LR space (tiles of 8 LR px = 32 px through the VAE): same size, finite, and the same image where a
    # single tile covers it all.
    model = load_model(str(folder))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    whole = upscale_rgb(model, x, tile=64)
    tiled = upscale_rgb(model, x, tile=8, overlap=4)
    assert tiled.shape == whole.shape == (1, 3, 72, 92) and torch.isfinite(tiled).all()
    torch.testing.assert_close(upscale_rgb(model, x, tile=24), whole)
    taught = upscale_rgb(model, x, steps=2, teacher_guidance=3.0)
    assert taught.shape == whole.shape


def test_vae_model_without_its_vae_is_a_clear_error(tmp_path):
    from mfsr_fast.inference import upscale

    folder = _vae_student_folder(tmp_path, with_vae=False)
    with pytest.raises(ValueError, match="uses the SD3 VAE, but there is no vae/ folder"):
        upscale(torch.rand(3, 8, 8), model=str(folder))


@pytest.mark.parametrize("bug", [False, True], ids=["own-lr-keys", "released-dit4sr"])
def test_lr_stream_attention_against_explicit_formula(bug):
    """One joint attention with the LR stream, written out with SDPA: image queries/keys/values, LR ones through the
    control projections after the shared ones (or, as the released DiT4SR code, LR keys = norm_k(norm_k(image
    keys))), context ones, QK RMSNorm with non-unit weights, the LR residual, separate output projections."""
    import torch.nn.functional as F

    from mfsr_fast.model import Attention, MFSRConfig
    from mfsr_fast.tangent import Dual

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


def test_evaluate_a_dit4sr_teacher_with_prompts_and_vae(tmp_path):
    import numpy as np
    from PIL import Image

    from mfsr_fast import evaluate

    folder, vae, prompts = dit4sr_kit(tmp_path)
    data = tmp_path / "pairs"
    (data / "HR").mkdir(parents=True)
    (data / "LR").mkdir()
    hr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hr.save(data / "HR" / "a_HR.png")
    hr.resize((16, 16), Image.BICUBIC).save(data / "LR" / "a_LR.png")
    out = tmp_path / "table.md"
    args = ["--data", str(data), "--teacher", str(folder), "--methods", "teacher:1,teacher:2:cfg8.0"]
    assert evaluate.main([*args, "--prompts", prompts, "--vae", vae, "--output", str(out)]) == 0
    table = out.read_text()
    assert "| teacher:1 | 1 |" in table and "| teacher:2:cfg8.0 | 4 |" in table
    with pytest.raises(SystemExit, match="pass --prompts"):
        evaluate.main([*args, "--vae", vae])
    with pytest.raises(SystemExit, match="pass --vae"):
        evaluate.main([*args, "--prompts", prompts])
