"""Image-quality measures of the SR literature: PSNR and SSIM (RGB and Y, border crop) and NIQE.

- PSNR / SSIM come from scikit-image (``skimage.metrics``), on 8-bit values; SSIM with the Gaussian window of the
  original paper (sigma 1.5, population covariance), which is MATLAB's ``ssim``. Y is MATLAB's ``rgb2ycbcr`` luma.
- Texture against the photo (``texture_ratios``, this project's own guard, not a literature measure): the RMS
  high-frequency amplitude of the output's Y over that of the HR's, on the HR's flattest quarter of pixels (above 1:
  texture the photo does not have there, grain or mottle, which NIQE can reward) and on its busiest quarter (below 1:
  detail lost, blur, which NIQE barely sees).
- NIQE (Mittal, Soundararajan, Bovik 2013) is implemented here from the published algorithm: MSCN coefficients,
  asymmetric generalised Gaussian fits of them and of their four pairwise products, on 96 x 96 blocks at two scales
  (the second after MATLAB's antialiased bicubic ``imresize`` by 1/2), compared with a pristine multivariate Gaussian
  model. The pristine parameters are not shipped: pass the path of an ``.npz`` with ``mu_pris_param``,
  ``cov_pris_param`` and ``gaussian_window`` (the MATLAB release's values, e.g. as redistributed by BasicSR).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from scipy.ndimage import convolve
from scipy.special import gamma
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mfsr_fast.pipeline.texture import TEXTURE_SIGMA, Y_WEIGHTS, local_texture

NIQE_HELP = ("NIQE needs the pristine-model parameters of the original MATLAB release (mu_pris_param, "
             "cov_pris_param, gaussian_window) as an .npz file; they are not part of this package. BasicSR "
             "redistributes them as niqe_pris_params.npz (Apache-2.0); pass its path with --niqe-params.")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma of an RGB image in [0, 255] (float64 out, in [16, 235])."""
    img = img.astype(np.float64)
    return 16.0 + sum(w * img[..., c] for c, w in enumerate(Y_WEIGHTS)) / 255.0


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def psnr(a: np.ndarray, b: np.ndarray, border: int = 4, y: bool = False) -> float:
    """PSNR of two uint8 RGB images (H, W, 3), after cropping ``border`` pixels; on Y when ``y``."""
    a, b = crop_border(a, border).astype(np.float64), crop_border(b, border).astype(np.float64)
    if y:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray, border: int = 4, y: bool = False) -> float:
    a, b = crop_border(a, border).astype(np.float64), crop_border(b, border).astype(np.float64)
    kw = dict(data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if y:
        return float(structural_similarity(rgb_to_y(a), rgb_to_y(b), **kw))
    return float(structural_similarity(a, b, channel_axis=2, **kw))


# Texture against the photo.


def texture_ratios(sr: np.ndarray, hr: np.ndarray, border: int = 0, quarter: float = 0.25) -> tuple[float, float]:
    """(flat, busy) of two uint8 RGB images of one size: RMS ``local_texture`` of ``sr``'s Y over ``hr``'s, on the
    ``quarter`` of pixels where ``hr``'s is lowest and on the quarter where it is highest. 1: the photo's texture;
    flat > 1: texture the photo does not have where it is flat; busy < 1: detail lost where it is busy."""
    if sr.shape != hr.shape:
        raise ValueError(f"texture_ratios: images of different shapes, {sr.shape} and {hr.shape}")
    y = [torch.from_numpy(rgb_to_y(crop_border(a, border)))[None, None] for a in (sr, hr)]
    if min(y[0].shape[-2:]) <= 3 * TEXTURE_SIGMA:
        raise ValueError(f"texture_ratios: {tuple(y[0].shape[-2:])} px after the border crop; the high-pass needs "
                         f"more than {3 * TEXTURE_SIGMA:g} px on a side")
    t_sr, t_hr = (local_texture(a).flatten() for a in y)
    q_lo, q_hi = np.quantile(t_hr.numpy(), [quarter, 1 - quarter])  # (torch.quantile stops at 2^24 pixels)
    lo, hi = t_hr <= q_lo, t_hr >= q_hi
    eps = 1e-6  # (Y levels)^2, far below a photograph's: two textureless areas compare as equal, not 0 / 0
    return tuple(float(((t_sr[m].mean() + eps) / (t_hr[m].mean() + eps)).sqrt()) for m in (lo, hi))


# MATLAB-compatible imresize (bicubic, antialiased when shrinking).


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])  # MATLAB's symmetric boundary
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), taps), cols.ravel()), w.ravel())
    return m


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiasing on) of a 2-D float image."""
    h, w = img.shape
    oh, ow = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    return _resize_matrix(h, oh, scale) @ img @ _resize_matrix(w, ow, scale).T


# NIQE.


def load_niqe_params(path: str | None) -> dict:
    if not path:
        raise FileNotFoundError(NIQE_HELP)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found. {NIQE_HELP}")
    with np.load(path) as d:
        missing = {"mu_pris_param", "cov_pris_param", "gaussian_window"} - set(d.files)
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}. {NIQE_HELP}")
        return {k: d[k].astype(np.float64) for k in ("mu_pris_param", "cov_pris_param", "gaussian_window")}


_GAM = np.arange(0.2, 10.001, 0.001)


@functools.lru_cache(maxsize=1)
def _r_gam() -> np.ndarray:
    """rho(gamma) = Gamma(2/g)^2 / (Gamma(1/g) Gamma(3/g)) over the search grid: computed once."""
    return gamma(2 / _GAM) ** 2 / (gamma(1 / _GAM) * gamma(3 / _GAM))


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (alpha, beta_left, beta_right)."""
    x = x.ravel()
    r_gam = _r_gam()
    left = math.sqrt(np.mean(x[x < 0] ** 2)) if np.any(x < 0) else 0.0
    right = math.sqrt(np.mean(x[x > 0] ** 2)) if np.any(x > 0) else 0.0
    g = left / right if right > 0 else np.inf
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    rnorm = rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    alpha = _GAM[np.argmin((r_gam - rnorm) ** 2)]
    f = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return float(alpha), left * f, right * f


def _block_features(block: np.ndarray) -> list[float]:
    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha)
        feats += [alpha, mean, bl, br]
    return feats


def niqe(img: np.ndarray, params: dict, block: int = 96) -> float:
    """NIQE of a 2-D image in [0, 255] (for RGB input pass ``niqe_rgb``). Lower is more natural."""
    img = img.astype(np.float64)
    h, w = img.shape
    nh, nw = h // block, w // block
    if nh < 1 or nw < 1:
        raise ValueError(f"NIQE needs an image of at least {block} x {block} pixels, got {w} x {h}")
    img = img[: nh * block, : nw * block]
    win = params["gaussian_window"]
    feats = []
    for scale in (1, 2):
        mu = convolve(img, win, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, win, mode="nearest") - mu * mu))
        mscn = (img - mu) / (sigma + 1)
        b = block // scale
        feats.append(np.array([_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                               for j in range(nw) for i in range(nh)]))
        if scale == 1:
            img = imresize(img / 255.0, 0.5) * 255.0
    dist = np.concatenate(feats, axis=1)
    mu_d = np.nanmean(dist, axis=0)
    clean = dist[~np.isnan(dist).any(axis=1)]
    cov_d = np.cov(clean, rowvar=False)
    diff = params["mu_pris_param"].ravel() - mu_d
    inv = np.linalg.pinv((params["cov_pris_param"] + cov_d) / 2)
    return float(np.sqrt(diff @ inv @ diff))


def niqe_rgb(img: np.ndarray, params: dict, border: int = 0) -> float:
    """NIQE on the 8-bit-rounded MATLAB luma of a uint8 RGB image (the literature's convention)."""
    y = np.round(rgb_to_y(crop_border(img, border)))
    return niqe(y, params)
