"""Parity with a peer implementation: diffusers' SD3Transformer2DModel converted by mfsr_fast.convert."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from mfsr_fast.models.convert import convert_sd3_state_dict, from_sd3


def _random_sd35(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
               joint_attention_dim=12, caption_projection_dim=32, pooled_projection_dim=10, out_channels=4,
               pos_embed_max_size=24, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    cfg.update(kw)
    sd3 = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():  # diffusers' init leaves norms at 1: perturb everything so every weight matters
        for name, p in sd3.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if "norm_" in name else 0.0))
    return sd3


@pytest.mark.parametrize("size", [(12, 20), (16, 16), (30, 30)], ids=["12x20", "16x16", "30x30-beyond-sample"])
@pytest.mark.parametrize("dual", [(0, 1), ()], ids=["sd35-dual", "sd3"])
def test_sd3_parity_fp32(size, dual):
    sd3 = _random_sd35(dual_attention_layers=dual)
    m = from_sd3(sd3).eval()
    g = torch.Generator().manual_seed(1)
    B = 2
    z = torch.randn(B, 4, *size, generator=g)
    ctx = torch.randn(B, 7, 12, generator=g)
    pooled = torch.randn(B, 10, generator=g)
    t = torch.rand(B, generator=g)
    with torch.no_grad():
        ref = sd3(z, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t * 1000).sample
        out = m(z, None, t, t, context=ctx, pooled=pooled)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel


def test_converted_model_is_sensitive_to_every_block():
    """Guard against a parity test that passes because a converted weight is ignored."""
    sd3 = _random_sd35()
    m = from_sd3(sd3).eval()
    z, ctx, pooled, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 12), torch.randn(1, 10), torch.rand(1)
    with torch.no_grad():
        ref = sd3(z, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t * 1000).sample
        for name, p in m.named_parameters():
            if name.startswith("h_embed.") or "control" in name:
                continue
            saved = p.clone()
            p.add_(0.05 * torch.randn_like(p) + 0.05)
            out = m(z, None, t, t, context=ctx, pooled=pooled)
            p.copy_(saved)
            assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6), f"{name} has no effect"


def test_conversion_reports_missing_and_unexpected_keys():
    sd3 = _random_sd35()
    sd = sd3.state_dict()
    broken = {k: v for k, v in sd.items() if "transformer_blocks.1.attn.to_k" not in k}
    broken["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(1\).*extra.*missing keys \(2\).*blocks\.1\.attn"
                                         r"\.to_k"):
        from_sd3((dict(sd3.config), broken))


def test_conversion_with_fresh_lr_stream_starts_dit4sr_style():
    sd3 = _random_sd35()
    m = from_sd3(sd3, lr_stream=True).eval()
    for blk in m.blocks:
        torch.testing.assert_close(blk.attn.to_out_control.weight, blk.attn.to_out.weight)
        assert torch.count_nonzero(blk.attn.to_q_control.weight) == 0
    assert "blocks.0.ff.fc1.weight" in convert_sd3_state_dict(sd3.state_dict())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        u = m(z, torch.randn_like(z), torch.rand(1), context=torch.randn(1, 5, 12), pooled=torch.randn(1, 10))
    assert torch.isfinite(u).all()
