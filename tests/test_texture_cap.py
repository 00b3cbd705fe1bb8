"""``distill --trajectory-texture-cap``: the stored targets' texture capped at the HR crop's, per pixel."""

from __future__ import annotations

import torch

from mfsr_fast.codec import PixelCodec
from mfsr_fast.metrics import local_texture
from mfsr_fast.model import MFSRTransformer
from training.distill import cap_texture, texture_cap_scale


def _checker(h: int, w: int, amp: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return amp * ((x + y) % 2 * 2 - 1).float()


def test_local_texture_sees_fine_detail_not_flat_or_smooth_areas():
    flat = torch.full((1, 3, 32, 32), 0.4)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)  # smooth: no fine detail
    busy = 0.5 + _checker(32, 32, 0.1).expand(1, 3, 32, 32)
    assert local_texture(flat, 5).abs().max() < 1e-12
    assert local_texture(ramp, 5)[..., 8:24, 8:24].max() < 1e-6
    assert local_texture(busy, 5)[..., 8:24, 8:24].min() > 1e-3
    assert local_texture(busy, 5).shape == (1, 1, 32, 32)


def test_the_scale_brings_a_busier_target_down_to_the_photos_texture_only():
    """Left half: the photo is flat, the target busy; right half: both equally busy. The scale is ~0 on the left,
    1 on the right, never above 1, and scaling the target's texture by it gives the photo's energy."""
    hr = torch.full((1, 3, 32, 64), 0.5)
    hr[..., 32:] += _checker(32, 32, 0.1)
    target = 0.5 + _checker(32, 64, 0.1).expand(1, 3, 32, 64)
    s = texture_cap_scale(target, hr, 5)
    assert s.shape == (1, 1, 32, 64) and (s <= 1).all() and (s >= 0).all()
    assert s[..., :24].max() < 1e-3 and torch.equal(s[..., 40:], torch.ones_like(s[..., 40:]))
    half = 0.5 + _checker(32, 64, 0.05).expand(1, 3, 32, 64)  # half the photo's amplitude on the left
    hr2 = 0.5 + _checker(32, 64, 0.025).expand(1, 3, 32, 64)
    torch.testing.assert_close(texture_cap_scale(half, hr2, 5), torch.full_like(s, 0.5), rtol=0, atol=1e-5)


def test_cap_texture_scales_the_difference_from_the_anchor_per_pixel():
    """In the flow space of a residual model over the pixel codec: the decoded result is anchor + s (target - anchor)
    pixel by pixel, with s measured on the target's image against the photo; where s is 1 the target is unchanged."""
    torch.manual_seed(0)
    model = MFSRTransformer.from_preset("tiny-r", num_layers=1, dual_attention_layers=(0,), num_heads=2,
                                        head_dim=16)
    codec = PixelCodec(4)
    assert model.cfg.residual_scale > 0
    c = torch.rand(2, model.cfg.in_channels * 2, 8, 8) * 0.2  # the base R(LR) sits in the first channels
    anchor = 0.49 + 0.02 * torch.rand(2, 3, 32, 32)  # a faint texture of its own, inside (0, 1): no clamping
    target = anchor + _checker(32, 32, 0.1) * (torch.arange(32) < 16).float()  # texture on the left half only
    hr = anchor.clone()
    hr[0] += _checker(32, 32, 0.1)  # photo 0 as busy as the target; photo 1 flat
    x2 = model.to_flow(codec.encode(target), c)
    x_a = model.to_flow(codec.encode(anchor), c)
    out = cap_texture(x2, x_a, hr, model, codec, c, 5)
    s = texture_cap_scale(target, hr, 5)
    img = codec.decode(model.from_flow(out, c))
    torch.testing.assert_close(img, anchor + s * (target - anchor), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], x2[0], rtol=0, atol=1e-4)  # photo 0 as busy: kept (flow: 8x the pixels)
    left = (img[1] - anchor[1])[..., :12]  # photo 1 flat: its texture mostly taken out
    assert left.abs().max() < 0.5 * (target[1] - anchor[1])[..., :12].abs().max()
