"""Local texture of an image: the RMS of its high frequencies over a neighbourhood, on MATLAB's luma.

The composition with R(LR) (``compose.flat_weight``) uses it to find where R(LR) is flat, and the evaluation's
texture measure (``evaluation.metrics.texture_ratios``) to compare an output's texture with the photo's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Y_WEIGHTS = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr's luma row, for RGB in [0, 1]
TEXTURE_SIGMA = 1.5  # px: the high-pass is the image minus its Gaussian blur of this sigma
TEXTURE_WINDOW = 17  # px: the side of the neighbourhood the high-frequency energy is averaged over


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """MATLAB rgb2ycbcr luma of a (B, 3, H, W) tensor in [0, 1] -> (B, 1, H, W) in [16, 235], in the tensor's dtype."""
    return 16.0 + sum(w * rgb[:, c:c + 1] for c, w in enumerate(Y_WEIGHTS))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), 3 sigma each side, reflected at the borders."""
    k = 2 * int(3 * sigma) + 1
    g = torch.exp(-(torch.arange(k, dtype=x.dtype, device=x.device) - k // 2) ** 2 / (2 * sigma * sigma))
    g = g / g.sum()
    C = x.shape[1]
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(C, 1, 1, k).contiguous(), groups=C)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(C, 1, k, 1).contiguous(), groups=C)


def local_texture(img: torch.Tensor, window: int = TEXTURE_WINDOW) -> torch.Tensor:
    """(B, C, H, W) float tensor -> (B, 1, H, W): the high-frequency energy (the image minus its Gaussian blur of
    TEXTURE_SIGMA px, squared, mean over channels) averaged over a window x window neighbourhood (shrunk at the
    borders). Images at least 3 sigma + 1 pixels on a side."""
    hf = (img - gaussian_blur(img, TEXTURE_SIGMA)).pow(2).mean(1, keepdim=True)
    return F.avg_pool2d(hf, window, 1, window // 2, count_include_pad=False)
