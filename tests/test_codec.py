from __future__ import annotations

import pytest
import torch

from mfsr_fast import MFSRTransformer
from mfsr_fast.models.codec import PixelCodec


def test_pixel_codec_roundtrip_and_matches_small_presets():
    codec = PixelCodec(4)
    img = torch.rand(2, 3, 32, 48)
    z = codec.encode(img)
    assert z.shape == (2, 48, 8, 12) and z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(codec.decode(z), img)
    # Each latent channel is one pixel of a 4x4 cell of one colour.
    assert z[0, 0, 0, 0] == img[0, 0, 0, 0] * 2 - 1 and z[0, 1, 0, 0] == img[0, 0, 0, 1] * 2 - 1
    for name in ("tiny", "small"):
        assert MFSRTransformer.from_preset(name).cfg.in_channels == codec.latent_channels


def test_pixel_codec_rejects_bad_shapes():
    codec = PixelCodec(4)
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected"):
        codec.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.rand(1, 16, 8, 8))


# The SD3 VAE codec, through diffusers' own AutoencoderKL (a tiny random one written by save_pretrained).


def _tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=64,
                         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def _smooth_image(size=(96, 128), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, size[0] // 8, size[1] // 8, generator=g), size=size,
                                           mode="bicubic", align_corners=False).clamp(0, 1)


def test_vae_codec_shift_scale_and_saved_folder(tmp_path):
    from mfsr_fast.models.codec import VAECodec

    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    codec = VAECodec.from_pretrained(tmp_path)  # a pipeline folder: finds vae/
    assert (codec.factor, codec.latent_channels, codec.shift, codec.scale) == (8, 16, 0.0609, 1.5305)
    img = _smooth_image()
    z = codec.encode(img)
    assert z.shape == (1, 16, 12, 16)
    with torch.no_grad():
        mean = vae.encode(img * 2 - 1).latent_dist.mean
        torch.testing.assert_close(z, (mean - 0.0609) * 1.5305)
        torch.testing.assert_close(codec.decode(z), ((vae.decode(mean).sample + 1) / 2).clamp(0, 1))
    with pytest.raises(ValueError, match="divisible by 8"):
        codec.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="no config.json"):
        VAECodec.from_pretrained(tmp_path / "missing")


def test_vae_codec_tiled_against_untiled():
    """diffusers' tiled encode/decode: same shapes, identical when one tile covers the image, and closer to the
    untiled result as tiles grow. A random VAE is far from tile-invariant (its group norms and zero padding see each
    tile), so the error itself is only bounded loosely here; upscale() tiles in image space instead."""
    from mfsr_fast.models.codec import VAECodec

    codec = VAECodec(_tiny_vae())
    img = _smooth_image((128, 192))
    z = codec.encode(img)
    x = codec.decode(z)
    codec.set_tiling(256)  # one tile covers everything: the untiled path
    torch.testing.assert_close(codec.encode(img), z)
    torch.testing.assert_close(codec.decode(z), x)
    errs = []
    for tile in (64, 128):
        codec.set_tiling(tile)
        zt, xt = codec.encode(img), codec.decode(z)
        assert zt.shape == z.shape and xt.shape == x.shape
        errs.append(((xt - x).norm() / (x - x.mean()).norm()).item())
    codec.set_tiling(None)
    torch.testing.assert_close(codec.decode(z), x)
    assert errs[1] < errs[0] < 2.0, errs
    with pytest.raises(ValueError, match="multiple of 8"):
        codec.set_tiling(60)
