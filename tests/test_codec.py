from __future__ import annotations

import pytest
import torch

from mfsr_fast import MFSRTransformer
from mfsr_fast.codec import PixelCodec


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
