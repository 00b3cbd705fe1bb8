"""Loading DiT4SR and SD3.5 checkpoints (mfsr_fast.convert) with tiny random ones written by diffusers' own
save_pretrained: plain SD3.5 transformers, DiT4SR-format ones (the SD3 keys plus synthetic control weights), sharded,
.bin and broken ones. ``dit4sr_kit`` is shared with the evaluation test (test_metrics.py)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from mfsr_fast.models.convert import load_transformer, read_checkpoint

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

    from mfsr_fast.models.prompts import save_prompts

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
