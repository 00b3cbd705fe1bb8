"""LPIPS (Zhang et al. 2018, VGG variant, v0.1) and DISTS (Ding et al. 2020) from weight files the user supplies.

Both rest on an ImageNet-trained VGG16 that cannot be downloaded here, and their reference packages (``lpips``,
``DISTS_pytorch``, ``piq``) import torchvision, whose PyPI builds do not load on a CPU build of torch. So the VGG16
trunk is built here (it is 13 convolutions) and reads torchvision's own state-dict file; the learned LPIPS layer
weights and the DISTS alpha / beta come from the files those packages ship. ``weight_folder`` names the three files
and where each comes from.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (models.VGG16_Weights.IMAGENET1K_V1)
LPIPS_FILE = "vgg.pth"  # the lpips package's lpips/weights/v0.1/vgg.pth
DISTS_FILE = "weights.pt"  # the DISTS_pytorch package's DISTS_pytorch/weights.pt
WEIGHTS_HELP = (f"LPIPS and DISTS need local weight files in one folder (--perceptual-weights DIR): {VGG16_FILE} "
                f"(torchvision's ImageNet VGG16, from download.pytorch.org/models/{VGG16_FILE} or a torch hub cache), "
                f"{LPIPS_FILE} (LPIPS v0.1 linear layers: lpips/weights/v0.1/vgg.pth inside the `lpips` package) and "
                f"{DISTS_FILE} (DISTS alpha/beta: DISTS_pytorch/weights.pt inside the `DISTS_pytorch` package). "
                "None of them ships with mfsr-fast.")

# VGG16 'features': (out channels) per conv, 'M' = 2x2 max pool; the five stages end at relu1_2, relu2_2,
# relu3_3, relu4_3 and relu5_3 (torchvision indices 3, 8, 15, 22, 29).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file
        raise ValueError(f"{path}: not a readable weight file ({type(e).__name__}: {e})") from None


def weight_folder(folder: str, measures=("lpips", "dists")) -> dict[str, str]:
    """The weight files' paths in ``folder`` that ``measures`` need; ValueError naming what is missing and where it
    comes from."""
    paths = {k: os.path.join(folder, f) for k, f in (("vgg16", VGG16_FILE), ("lpips", LPIPS_FILE),
                                                     ("dists", DISTS_FILE)) if k == "vgg16" or k in measures}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if not os.path.isdir(folder) or missing:
        raise ValueError(f"{folder}: missing {', '.join(missing) if os.path.isdir(folder) else 'folder'}. "
                         f"{WEIGHTS_HELP}")
    return paths


class VGG16Stages(nn.Module):
    """torchvision's VGG16 ``features`` (same parameter names, ``features.N.weight``), returning the five stage
    outputs. ``l2pool``: DISTS's Hanning-window L2 pooling in place of max pooling."""

    def __init__(self, l2pool: bool = False):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(L2Pool(c) if l2pool else nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)  # indices 0-29 as torchvision's (its final pool, 30, is unused)
        self.ends = (3, 8, 15, 22, 29)

    def load_vgg16(self, path: str) -> VGG16Stages:
        sd = _load(path)
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
        try:
            self.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: not torchvision's VGG16 state dict ({str(e).splitlines()[0]})") from None
        return self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.ends:
                out.append(x)
        return out


class L2Pool(nn.Module):
    """sqrt(conv(x^2, g)) with g the normalised outer product of a 5-tap Hanning window's inner 3 taps, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.from_numpy(np.hanning(5)[1:-1]).float()
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (y + 1e-12).sqrt()


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1: channel-normalised VGG features, squared difference, learned non-negative channel weights,
    spatial mean, summed over the five stages. Images (B, 3, H, W) in [0, 1]; lower = more similar."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, vgg16_path: str, lpips_path: str):
        super().__init__()
        self.vgg = VGG16Stages().load_vgg16(vgg16_path)
        sd = _load(lpips_path)
        try:
            self.lins = [sd[f"lin{i}.model.1.weight"].float().reshape(1, c, 1, 1) for i, c in enumerate(CHANNELS)]
        except (KeyError, RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"{lpips_path}: not the LPIPS v0.1 VGG layer weights ({type(e).__name__}: {e})") from None
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.vgg(((a * 2 - 1) - self.shift) / self.scale)
        fb = self.vgg(((b * 2 - 1) - self.shift) / self.scale)
        total = a.new_zeros(a.shape[0])
        for x, y, w in zip(fa, fb, self.lins):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((x - y).pow(2) * w.to(x)).sum(1).mean((1, 2))
        return total


class DISTS(nn.Module):
    """DISTS: per stage (the image itself, then the five L2-pooled VGG stages), a structure term from feature means
    and a texture term from feature (co)variances, weighted by learned alpha / beta that sum to one overall.
    Images (B, 3, H, W) in [0, 1]; 0 for identical images, lower = more similar."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, vgg16_path: str, dists_path: str):
        super().__init__()
        self.vgg = VGG16Stages(l2pool=True).load_vgg16(vgg16_path)
        sd = _load(dists_path)
        chns = (3,) + CHANNELS
        try:
            alpha, beta = sd["alpha"].float(), sd["beta"].float()
            if alpha.shape != (1, sum(chns), 1, 1) or beta.shape != alpha.shape:
                raise ValueError(f"alpha/beta of shape {tuple(alpha.shape)}, expected {(1, sum(chns), 1, 1)}")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{dists_path}: not the DISTS weights ({type(e).__name__}: {e})") from None
        total = alpha.sum() + beta.sum()
        self.alphas = list(torch.split(alpha / total, chns, dim=1))
        self.betas = list(torch.split(beta / total, chns, dim=1))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = [a] + self.vgg((a - self.mean) / self.std)
        fb = [b] + self.vgg((b - self.mean) / self.std)
        c1 = c2 = 1e-6
        s = a.new_zeros(a.shape[0])
        for x, y, al, be in zip(fa, fb, self.alphas, self.betas):
            mx, my = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
            structure = (2 * mx * my + c1) / (mx * mx + my * my + c1)
            vx = (x - mx).pow(2).mean((2, 3), keepdim=True)
            vy = (y - my).pow(2).mean((2, 3), keepdim=True)
            cov = (x * y).mean((2, 3), keepdim=True) - mx * my
            texture = (2 * cov + c2) / (vx + vy + c2)
            s = s + (al.to(x) * structure).sum((1, 2, 3)) + (be.to(x) * texture).sum((1, 2, 3))
        return 1 - s


class Perceptual:
    """The chosen measures ("lpips", "dists") on uint8 (H, W, 3) arrays, from one folder of weight files."""

    def __init__(self, folder: str, device=None, measures=("lpips", "dists")):
        unknown = sorted(set(measures) - {"lpips", "dists"})
        if unknown or not measures:
            raise ValueError(f"measures must be among 'lpips' and 'dists', got {list(measures)}")
        paths = weight_folder(folder, measures)
        self.device = torch.device(device or "cpu")
        self.nets = {}
        if "lpips" in measures:
            self.nets["lpips"] = LPIPS(paths["vgg16"], paths["lpips"]).to(self.device)
        if "dists" in measures:
            self.nets["dists"] = DISTS(paths["vgg16"], paths["dists"]).to(self.device)

    def _tensor(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float().to(self.device) / 255

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[2] != 3:
            raise ValueError(f"expected two (H, W, 3) images of one size, got {sr.shape} and {hr.shape}")
        a, b = self._tensor(sr), self._tensor(hr)
        return {k: float(net(a, b)[0]) for k, net in self.nets.items()}
