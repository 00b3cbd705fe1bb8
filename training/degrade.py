"""Real-ESRGAN second-order degradation (Wang et al. 2021), batched in PyTorch, on CPU or GPU, seeded.

HR (B, 3, H, W) in [0, 1] -> (sharpened HR, LR (B, 3, H / s, W / s) quantised to 8 bits). Stages (DESIGN section 6):
USM-sharpen the HR; stage 1: blur, random resize, Gaussian or Poisson noise, JPEG; stage 2: blur (p), random resize,
noise, then in random order [resize to the LR size + final sinc filter] and JPEG. Every range and probability lives in
``DegradationConfig``. Blur kernels, noise and JPEG quality are drawn per sample; the resize scale and mode per batch
(the batch keeps one size). JPEG is a real baseline JPEG round trip (4:2:0 chroma, standard quantisation tables scaled
by quality, 8x8 DCT, rounding) written in PyTorch, so it runs batched on the GPU.

Caution:
- Randomness comes from the ``torch.Generator`` you pass (CPU generator; tensors move to the image's device), so the
  same seed gives the same LR on the same device; GPU and CPU results differ in the last float bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclass(frozen=True)
class StageConfig:
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_up: tuple[float, float] = (1.0, 1.5)
    resize_down: tuple[float, float] = (0.15, 1.0)
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # in 8-bit units
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[float, float] = (30.0, 95.0)


@dataclass(frozen=True)
class DegradationConfig:
    scale: int = 4
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0  # in 8-bit units
    pad_to: int = 21
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(
        sigma=(0.2, 1.5), blur_prob=0.8, resize_probs=(0.3, 0.4, 0.3), resize_up=(1.0, 1.2), resize_down=(0.3, 1.0),
        noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5)))
    final_sinc_prob: float = 0.8
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")


PRESETS = {
    "realesrgan": DegradationConfig(),
    # DiT4SR's training set-up: milder noise and JPEG.
    "dit4sr": DegradationConfig(
        stage1=StageConfig(noise_sigma=(1.0, 15.0), jpeg_quality=(60.0, 95.0)),
        stage2=StageConfig(sigma=(0.2, 1.5), blur_prob=0.8, resize_probs=(0.3, 0.4, 0.3), resize_up=(1.0, 1.2),
                           resize_down=(0.3, 1.0), noise_sigma=(1.0, 12.0), poisson_scale=(0.05, 2.5),
                           jpeg_quality=(60.0, 100.0))),
    # Camera-like degradations (the restorer-conditioned default, DESIGN section 8): optical blur, a mild resize,
    # sensor noise and light JPEG, as in real zoom pairs (DRealSR), where Real-ESRGAN already undoes the heavy mix.
    # Why the default's recipe uses it: docs/results/how-the-default-was-made.md.
    "mild": DegradationConfig(
        stage1=StageConfig(sigma=(0.2, 1.5), sinc_prob=0.05, resize_probs=(0.1, 0.5, 0.4), resize_up=(1.0, 1.2),
                           resize_down=(0.7, 1.0), gaussian_noise_prob=0.6, noise_sigma=(1.0, 6.0),
                           poisson_scale=(0.05, 0.5), jpeg_quality=(75.0, 95.0)),
        stage2=StageConfig(sigma=(0.2, 1.0), sinc_prob=0.05, blur_prob=0.5, resize_probs=(0.2, 0.4, 0.4),
                           resize_up=(1.0, 1.1), resize_down=(0.8, 1.0), gaussian_noise_prob=0.6,
                           noise_sigma=(1.0, 4.0), poisson_scale=(0.05, 0.3), jpeg_quality=(80.0, 100.0)),
        final_sinc_prob=0.3),
}


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _choice(g: torch.Generator, items, probs=None):
    if probs is None:
        return items[int(torch.randint(len(items), (), generator=g))]
    p = torch.tensor(probs, dtype=torch.float64)
    return items[int(torch.multinomial(p / p.sum(), 1, generator=g))]


def _grid(size: int) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # (size, size, 2)


def _quad_form(size: int, sx: float, sy: float, theta: float) -> torch.Tensor:
    """x^T Sigma^-1 x on the grid for Sigma = R diag(sx^2, sy^2) R^T."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    inv = rot @ torch.diag(torch.tensor([1 / sx ** 2, 1 / sy ** 2], dtype=torch.float64)) @ rot.T
    x = _grid(size)
    return torch.einsum("hwi,ij,hwj->hw", x, inv, x)


def gaussian_family_kernel(kind: str, size: int, sx: float, sy: float, theta: float, beta: float = 1.0) -> torch.Tensor:
    """Normalised (size, size) kernel: Gaussian exp(-q/2), generalized exp(-q^beta/2), plateau 1/(1+q^beta)."""
    q = _quad_form(size, sx, sy, theta)
    if kind.startswith("generalized"):
        k = torch.exp(-0.5 * q.pow(beta))
    elif kind.startswith("plateau"):
        k = 1.0 / (1.0 + q.pow(beta))
    else:
        k = torch.exp(-0.5 * q)
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc) filter omega J1(omega r) / (2 pi r), normalised; cutoff omega in (0, pi]."""
    r = _grid(size).norm(dim=-1)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff ** 2 / (4 * math.pi)), k)
    return k / k.sum()


def _pad_kernel(k: torch.Tensor, to: int) -> torch.Tensor:
    p = (to - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p))


def random_kernel(g: torch.Generator, st: StageConfig, pad_to: int) -> torch.Tensor:
    """One stage's blur kernel, (pad_to, pad_to) float64, sums to 1."""
    size = _choice(g, st.kernel_sizes)
    if torch.rand((), generator=g).item() < st.sinc_prob:
        cutoff = _u(g, math.pi / 3, math.pi) if size < 13 else _u(g, math.pi / 5, math.pi)
        return _pad_kernel(sinc_kernel(size, cutoff), pad_to)
    kind = _choice(g, KERNEL_TYPES, st.kernel_probs)
    sx = _u(g, *st.sigma)
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sy, theta = (sx, 0.0) if iso else (_u(g, *st.sigma), _u(g, -math.pi, math.pi))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _u(g, st.betag[0], 1.0) if torch.rand((), generator=g).item() < 0.5 else _u(g, 1.0, st.betag[1])
    elif kind.startswith("plateau"):
        beta = _u(g, *st.betap)
    return _pad_kernel(gaussian_family_kernel(kind, size, sx, sy, theta, beta), pad_to)


def _padded(img: torch.Tensor, k: int) -> torch.Tensor:
    """img (B, C, H, W) padded by k // 2 on each side, as (1, B C, H + k - 1, W + k - 1) for a grouped conv."""
    B, C, H, W = img.shape
    mode = "reflect" if k // 2 < min(H, W) else "replicate"  # reflect needs the image wider than the pad
    return F.pad(img, (k // 2,) * 4, mode=mode).reshape(1, B * C, H + k - 1, W + k - 1)


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-D filtering: img (B, C, H, W), kernels (B, k, k) or (k, k); reflect padding."""
    B, C, H, W = img.shape
    if kernels.dim() == 2:
        kernels = kernels.expand(B, -1, -1)
    w = kernels.to(img).repeat_interleave(C, dim=0)[:, None]  # (B C, 1, k, k)
    return F.conv2d(_padded(img, kernels.shape[-1]), w, groups=B * C).reshape(B, C, H, W)


def filter2d_separable(img: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """``filter2d(img, torch.outer(k1, k1))`` as two 1-D passes (k1: (k,), odd k): 2k instead of k^2 multiplies per
    pixel, the same padding."""
    B, C, H, W = img.shape
    w = k1.to(img).expand(B * C, k1.shape[0])
    x = F.conv2d(_padded(img, k1.shape[0]), w[:, None, None, :], groups=B * C)  # along W
    x = F.conv2d(x, w[:, None, :, None], groups=B * C)  # along H
    return x.reshape(B, C, H, W)


def usm_sharpen(img: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking with a soft mask on the residual (Real-ESRGAN's USMSharp), img in [0, 1]. The Gaussian is
    separable, so it runs as two 1-D passes (the 51 x 51 2-D filter was half of the data-loading time)."""
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's default sigma for this size
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    g1 = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    g1 = g1 / g1.sum()
    blur = filter2d_separable(img, g1)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft = filter2d_separable(mask, g1)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])


def add_gaussian_noise(img, sigma, gray, g):
    """sigma (B,) in 8-bit units, gray (B,) bool: grey noise is one channel repeated."""
    B, C, H, W = img.shape
    n = torch.randn(B, C, H, W, generator=g).to(img)
    n_gray = torch.randn(B, 1, H, W, generator=g).to(img).expand(B, C, H, W)
    n = torch.where(gray.to(img.device)[:, None, None, None], n_gray, n)
    return img + n * (sigma.to(img) / 255.0)[:, None, None, None]


def add_poisson_noise(img, scale, gray, g):
    """Shot noise at the image's own number of grey levels (Real-ESRGAN), times scale (B,)."""
    q = (img.clamp(0, 1) * 255).round() / 255
    levels = torch.tensor([float(len(torch.unique(q[i]))) for i in range(q.shape[0])])
    vals = (2 ** torch.ceil(torch.log2(levels))).to(img)[:, None, None, None]
    color = torch.poisson((q * vals).cpu(), generator=g).to(img) / vals - q
    qg = _gray(q)
    gray_n = (torch.poisson((qg * vals).cpu(), generator=g).to(img) / vals - qg).expand_as(img)
    noise = torch.where(gray.to(img.device)[:, None, None, None], gray_n, color)
    return img + noise * scale.to(img)[:, None, None, None]


def random_noise(img, st: StageConfig, g):
    B = img.shape[0]
    gray = torch.rand(B, generator=g) < st.gray_noise_prob
    if torch.rand((), generator=g).item() < st.gaussian_noise_prob:
        sigma = st.noise_sigma[0] + (st.noise_sigma[1] - st.noise_sigma[0]) * torch.rand(B, generator=g)
        return add_gaussian_noise(img, sigma, gray, g)
    scale = st.poisson_scale[0] + (st.poisson_scale[1] - st.poisson_scale[0]) * torch.rand(B, generator=g)
    return add_poisson_noise(img, scale, gray, g)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


# Standard JPEG quantisation tables (ITU-T T.81, Annex K).
_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_Q_CHROMA = torch.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                                 dtype=torch.float32)


def _dct_matrix(device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.to(device=device, dtype=torch.float32)  # orthonormal DCT-II: coef = M X M^T


def quality_table(base: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's quality scaling: (B,) qualities in [1, 100] -> (B, 8, 8) tables in [1, 255]."""
    q = quality.clamp(1, 100)
    s = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    return ((base[None] * s[:, None, None] + 50) / 100).floor().clamp(1, 255)


def _blocks_roundtrip(x: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """x (B, H, W) level-shifted samples, H and W multiples of 8: DCT, quantise, dequantise, inverse DCT."""
    B, H, W = x.shape
    blocks = x.reshape(B, H // 8, 8, W // 8, 8).permute(0, 1, 3, 2, 4)  # (B, h, w, 8, 8)
    coef = dct @ blocks @ dct.T
    t = table[:, None, None]
    coef = torch.round(coef / t) * t
    out = dct.T @ coef @ dct
    return out.permute(0, 1, 3, 2, 4).reshape(B, H, W)


def jpeg(img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG round trip of img (B, 3, H, W) in [0, 1] at per-sample quality (B,); output in [0, 1], 8-bit."""
    B, C, H, W = img.shape
    dev = img.device
    ph, pw = (-H) % 16, (-W) % 16
    x = F.pad(img.float().clamp(0, 1) * 255, (0, pw, 0, ph), mode="replicate")
    x = x.round()
    r, g_, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g_ + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g_ + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g_ - 0.081312 * b + 128
    cb = F.avg_pool2d(cb[:, None], 2)[:, 0]  # 4:2:0 chroma
    cr = F.avg_pool2d(cr[:, None], 2)[:, 0]
    dct = _dct_matrix(dev)
    q = quality.to(dev, torch.float32)
    ql, qc = quality_table(_Q_LUMA.to(dev), q), quality_table(_Q_CHROMA.to(dev), q)
    y = _blocks_roundtrip(y - 128, ql, dct) + 128
    cb = _blocks_roundtrip(cb - 128, qc, dct)
    cr = _blocks_roundtrip(cr - 128, qc, dct)
    cb = F.interpolate(cb[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    cr = F.interpolate(cr[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    rgb = rgb.round().clamp(0, 255)[:, :, :H, :W] / 255
    return rgb.to(img.dtype)


def random_jpeg(img, st: StageConfig, g):
    qual = st.jpeg_quality[0] + (st.jpeg_quality[1] - st.jpeg_quality[0]) * torch.rand(img.shape[0], generator=g)
    return jpeg(img.clamp(0, 1), qual)


def _random_resize(img, st: StageConfig, cfg: DegradationConfig, g, base_hw: tuple[int, int] | None):
    kind = _choice(g, ("up", "down", "keep"), st.resize_probs)
    s = _u(g, *st.resize_up) if kind == "up" else _u(g, *st.resize_down) if kind == "down" else 1.0
    mode = _choice(g, cfg.resize_modes)
    if base_hw is None:  # stage 1: relative to the current size
        h, w = img.shape[-2:]
        return resize(img, (int(h * s), int(w * s)), mode)
    return resize(img, (int(base_hw[0] / cfg.scale * s), int(base_hw[1] / cfg.scale * s)), mode)


def degrade(hr: torch.Tensor, cfg: DegradationConfig = DegradationConfig(), *, generator: torch.Generator | None = None,
            seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sharpened HR, LR) from HR (B, 3, H, W) in [0, 1]; H and W divisible by ``cfg.scale``. LR is 8-bit quantised.

    Pass ``generator`` (a CPU ``torch.Generator``) or ``seed``: the same seed gives the same LR.
    """
    if hr.dim() != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade: hr must be (B, 3, H, W), got {tuple(hr.shape)}")
    H, W = hr.shape[-2:]
    if H % cfg.scale or W % cfg.scale:
        raise ValueError(f"degrade: H, W = {H}, {W} must be divisible by the scale {cfg.scale}")
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
    B = hr.shape[0]
    hr = hr.float().clamp(0, 1)
    gt = usm_sharpen(hr, cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold)

    # Stage 1.
    out = gt
    if torch.rand((), generator=g).item() < cfg.stage1.blur_prob:
        k1 = torch.stack([random_kernel(g, cfg.stage1, cfg.pad_to) for _ in range(B)])
        out = filter2d(out, k1)
    out = _random_resize(out, cfg.stage1, cfg, g, None)
    out = random_noise(out, cfg.stage1, g)
    out = random_jpeg(out, cfg.stage1, g)

    # Stage 2.
    if torch.rand((), generator=g).item() < cfg.stage2.blur_prob:
        k2 = torch.stack([random_kernel(g, cfg.stage2, cfg.pad_to) for _ in range(B)])
        out = filter2d(out, k2)
    out = _random_resize(out, cfg.stage2, cfg, g, (H, W))
    out = random_noise(out, cfg.stage2, g)
    lr_hw = (H // cfg.scale, W // cfg.scale)
    sinc = []
    for _ in range(B):
        if torch.rand((), generator=g).item() < cfg.final_sinc_prob:
            size = _choice(g, cfg.stage1.kernel_sizes)
            sinc.append(_pad_kernel(sinc_kernel(size, _u(g, math.pi / 3, math.pi)), cfg.pad_to))
        else:
            sinc.append(_pad_kernel(torch.ones(1, 1, dtype=torch.float64), cfg.pad_to))  # identity
    sinc = torch.stack(sinc)
    if torch.rand((), generator=g).item() < 0.5:
        out = resize(out, lr_hw, _choice(g, cfg.resize_modes))
        out = filter2d(out, sinc)
        out = random_jpeg(out, cfg.stage2, g)
    else:
        out = random_jpeg(out, cfg.stage2, g)
        out = resize(out, lr_hw, _choice(g, cfg.resize_modes))
        out = filter2d(out, sinc)
    lr = (out.clamp(0, 1) * 255).round() / 255
    return gt, lr
