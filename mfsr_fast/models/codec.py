"""Codecs between images and the model's latent space.

- ``PixelCodec``: pixel-unshuffle by ``factor`` (x4 by default), so an RGB image in [0, 1] becomes a (B, 3 f^2, H/f,
  W/f) latent in [-1, 1]; it lets the small presets run without a VAE (DESIGN section 4). Exact inverse.
- ``VAECodec``: the SD3 / SD3.5 VAE (diffusers ``AutoencoderKL``, 16 channels, /8) with the latent shift and scale
  from its own config: latent = (mean(q(z | image)) - shift_factor) * scaling_factor (SD3: 0.0609, 1.5305). Encoding
  takes the posterior mean, so it is deterministic. ``tile`` turns on diffusers' own tiled encode/decode (tiles of
  ``tile`` pixels, overlapping by ``overlap`` of a tile and blended) so that large images fit in memory.

Both map (B, 3, H, W) images in [0, 1] to (B, latent_channels, H / factor, W / factor) and back (decode clamps).

Caution: when tiled, the VAE's group norms, zero padding and mid-block attention see one tile at a time, so a tiled
result differs from an untiled one: by 50-100% (relative L2) for the tiny random VAE of tests/test_codec.py, whose
outputs are dominated by those effects; how much for the trained SD3.5 VAE was not measured (no weights here).
``upscale()`` does not tile the VAE: it tiles in image space and blends the decoded tiles. The pixel codec is exact.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

PIXEL_FACTOR = 4  # the pixel codec's unshuffle factor (the "pixel4" codec of a model's config)


class PixelCodec:
    def __init__(self, factor: int = 4, channels: int = 3):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.channels = channels
        self.latent_channels = channels * factor * factor

    def to(self, device=None, dtype=None) -> PixelCodec:
        return self

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


class VAECodec:
    """An ``AutoencoderKL`` as a codec. Build from a module or with ``VAECodec.from_pretrained(folder)``."""

    def __init__(self, vae, *, tile: int | None = None, overlap: float = 0.25):
        cfg = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.shift = float(cfg.shift_factor or 0.0)
        self.scale = float(cfg.scaling_factor)
        self.set_tiling(tile, overlap)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device=None, tile: int | None = None,
                        overlap: float = 0.25) -> VAECodec:
        """Load a diffusers AutoencoderKL folder (config.json + weights), or a pipeline folder with a ``vae/``."""
        path = os.fspath(path)
        if os.path.isdir(os.path.join(path, "vae")) and not os.path.isfile(os.path.join(path, "config.json")):
            path = os.path.join(path, "vae")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"VAE {path!r}: no config.json (expected a diffusers AutoencoderKL folder, e.g. the "
                             "'vae' folder of stable-diffusion-3.5-medium)")
        try:
            vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"VAE {path!r}: cannot load it as a diffusers AutoencoderKL: {e}") from e
        return cls(vae if device is None else vae.to(device=device), tile=tile, overlap=overlap)

    def set_tiling(self, tile: int | None, overlap: float = 0.25) -> VAECodec:
        """Tiled encode/decode with tiles of ``tile`` image pixels (a multiple of the factor); None: untiled."""
        vae = self.vae
        if tile is None:
            vae.use_tiling = False
            self.tile = None
            return self
        if tile < 2 * self.factor or tile % self.factor:
            raise ValueError(f"VAE tile must be a multiple of {self.factor} and >= {2 * self.factor}, got {tile}")
        if not 0 < overlap < 0.5:
            raise ValueError(f"VAE tile overlap must be in (0, 0.5), got {overlap}")
        vae.use_tiling = True
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // self.factor
        vae.tile_overlap_factor = overlap
        self.tile = tile
        return self

    def to(self, device=None, dtype=None) -> VAECodec:
        if device is not None:
            self.vae.to(device=device)
        if dtype is not None:
            self.vae.to(dtype=dtype)
        return self

    def _follow(self, x: torch.Tensor) -> None:
        """Move the VAE to the input's device (training hands it batches on the training device)."""
        if next(self.vae.parameters()).device != x.device:
            self.vae.to(x.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W divisible by the factor -> (B, 16, H / 8, W / 8) shifted and scaled."""
        if img.dim() != 4 or img.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(img.shape)}")
        if img.shape[-2] % self.factor or img.shape[-1] % self.factor:
            raise ValueError(f"image size {tuple(img.shape[-2:])} must be divisible by {self.factor}")
        self._follow(img)
        x = (img * 2 - 1).to(self.dtype)
        mean = self.vae.encode(x).latent_dist.mode()  # (B, 16, H / 8, W / 8)
        return ((mean.float() - self.shift) * self.scale).to(img.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode, clamped to [0, 1]."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        self._follow(z)
        lat = (z.float() / self.scale + self.shift).to(self.dtype)
        img = self.vae.decode(lat).sample  # (B, 3, H, W) in about [-1, 1]
        return ((img.float() + 1) / 2).clamp(0, 1).to(z.dtype)


def make_codec(cfg, vae: str | None = None, *, dtype: torch.dtype = torch.float32, device=None):
    """The codec a model's config (``MFSRConfig``) names: the pixel codec, or the SD3 VAE read from the folder ``vae``
    (its latent channels checked against the model's)."""
    if cfg.codec == "pixel4":
        return PixelCodec(PIXEL_FACTOR)
    if not vae:
        raise ValueError(f"this model uses the {cfg.codec!r} codec and no VAE folder was given (a model folder's "
                         "vae/, or the VAE it was trained with)")
    codec = VAECodec.from_pretrained(vae, dtype=dtype, device=device)
    if codec.latent_channels != cfg.in_channels:
        raise ValueError(f"the VAE in {vae} has {codec.latent_channels} latent channels, the model {cfg.in_channels}")
    return codec
