"""Codecs between images and the model's latent space.

``PixelCodec``: pixel-unshuffle by ``factor`` (x4 by default), so an RGB image in [0, 1] becomes a (B, 3 f^2, H/f, W/f)
latent in [-1, 1]; it lets the small presets run without a VAE (DESIGN section 4). Exact inverse. The SD3 VAE codec
comes with the checkpoint loaders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PixelCodec:
    def __init__(self, factor: int = 4, channels: int = 3):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.channels = channels
        self.latent_channels = channels * factor * factor

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], H and W divisible by the factor -> (B, C f^2, H / f, W / f) in [-1, 1]."""
        if img.dim() != 4 or img.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(img.shape)}")
        if img.shape[-2] % self.factor or img.shape[-1] % self.factor:
            raise ValueError(f"image size {tuple(img.shape[-2:])} must be divisible by {self.factor}")
        return F.pixel_unshuffle(img * 2 - 1, self.factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode, clamped to [0, 1]."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        return ((F.pixel_shuffle(z, self.factor) + 1) / 2).clamp(0, 1)
