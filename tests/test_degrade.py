"""Real-ESRGAN degradation (training/degrade.py): kernels, each stage's measurable effect, sizes, seeding."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training import degrade as D


def _image(B=2, H=64, W=64, seed=0, max_freq=12.0):
    """Smooth random image with edges: sums of random sinusoids plus a step."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    imgs = []
    for _ in range(B):
        chans = []
        for _ in range(3):
            f = torch.rand(4, generator=g) * max_freq
            ph = torch.rand(4, generator=g) * 6.28
            c = sum(torch.sin(f[i] * (xx if i % 2 else yy) * 3.14 + ph[i]) for i in range(4)) / 8 + 0.5
            c = c + 0.2 * (xx > 0.5).float()
            chans.append(c)
        imgs.append(torch.stack(chans))
    return torch.stack(imgs).clamp(0, 1)


def _hf_energy(img):
    """Energy of the Laplacian: drops when the image is blurred."""
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=img.dtype)
    return D.filter2d(img, lap).pow(2).mean().item()


@pytest.mark.parametrize("kind", D.KERNEL_TYPES)
def test_kernels_sum_to_one_and_are_centred(kind):
    k = D.gaussian_family_kernel(kind, 21, 2.0, 1.0, 0.7, beta=1.5)
    assert abs(k.sum().item() - 1) < 1e-12 and (k >= 0).all()
    ys, xs = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    assert abs((k * xs.double()).sum().item() - 10) < 1e-9 and abs((k * ys.double()).sum().item() - 10) < 1e-9


def test_random_kernels_sum_to_one_and_sigma_range_is_used():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        k = D.random_kernel(g, D.StageConfig(), 21)
        assert k.shape == (21, 21) and abs(k.sum().item() - 1) < 1e-9
    wide = dataclasses.replace(D.StageConfig(), sigma=(3.0, 3.0), sinc_prob=0.0, kernel_probs=(1, 0, 0, 0, 0, 0),
                               kernel_sizes=(21,))
    narrow = dataclasses.replace(wide, sigma=(0.5, 0.5))
    r2 = lambda k: (k * D._grid(21).pow(2).sum(-1)).sum().item()  # noqa: E731
    assert r2(D.random_kernel(g, wide, 21)) > 10 * r2(D.random_kernel(g, narrow, 21))
    s = D.sinc_kernel(13, math.pi / 3)
    assert abs(s.sum().item() - 1) < 1e-12


def test_blur_lowers_high_frequency_energy():
    img = _image()
    k = D.gaussian_family_kernel("iso", 21, 2.0, 2.0, 0.0)
    assert _hf_energy(D.filter2d(img, k)) < 0.2 * _hf_energy(img)


def test_sharpening_raises_high_frequency_energy():
    img = _image()
    assert _hf_energy(D.usm_sharpen(img)) > 1.2 * _hf_energy(img)


@pytest.mark.parametrize("size", [(2, 3, 40, 56), (1, 3, 12, 20)])  # reflect, and replicate (pad > image)
def test_separable_filter_matches_the_2d_filter(size):
    img = torch.rand(*size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ax = torch.arange(51, dtype=torch.float64) - 25
    g1 = torch.exp(-ax ** 2 / (2 * 8.3 ** 2))
    g1 = g1 / g1.sum()
    ref = D.filter2d(img, torch.outer(g1, g1))
    torch.testing.assert_close(D.filter2d_separable(img, g1), ref, rtol=0, atol=1e-12)


def test_noise_adds_the_requested_variance():
    img = _image(B=2, H=128, W=128)
    g = torch.Generator().manual_seed(0)
    out = D.add_gaussian_noise(img, torch.tensor([10.0, 20.0]), torch.tensor([False, True]), g)
    std = (out - img).flatten(1).std(1) * 255
    assert abs(std[0].item() - 10) < 0.5 and abs(std[1].item() - 20) < 1.0
    d = out - img
    # grey noise is the same in every channel, colour noise is not
    assert torch.allclose(d[1, 0], d[1, 1], atol=1e-6) and not torch.allclose(d[0, 0], d[0, 1], atol=1e-3)
    p = D.add_poisson_noise(img, torch.tensor([1.0, 3.0]), torch.tensor([False, False]), g) - img
    assert 0 < p[0].std() < p[1].std()


def test_jpeg_quality_changes_the_error_and_tracks_libjpeg():
    img = _image(B=1, H=64, W=80)
    errs = {}
    for q in (20, 50, 90):
        ours = D.jpeg(img, torch.tensor([float(q)]))
        assert ours.shape == img.shape
        assert torch.equal(ours, (ours * 255).round() / 255)  # 8-bit output
        errs[q] = (ours - img).pow(2).mean().item()
        arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=q)
        pil = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
        pil_err = (pil - img).pow(2).mean().item()
        assert 0.5 * pil_err < errs[q] < 2.0 * pil_err, (q, errs[q], pil_err)
    assert errs[20] > errs[50] > errs[90]


def test_degrade_sizes_quantisation_and_seed():
    hr = _image(B=3, H=64, W=96)
    gt, lr = D.degrade(hr, seed=5)
    assert gt.shape == hr.shape and lr.shape == (3, 3, 16, 24)
    assert torch.equal(lr, (lr * 255).round() / 255) and lr.min() >= 0 and lr.max() <= 1
    _, lr2 = D.degrade(hr, seed=5)
    _, lr3 = D.degrade(hr, seed=6)
    assert torch.equal(lr, lr2) and not torch.equal(lr, lr3)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(D.degrade(hr, generator=g)[1], lr)


def test_degradation_config_ranges_are_used():
    hr = _image(B=2, H=64, W=64, max_freq=2.0)  # smooth: 4:2:0 chroma keeps it at the 16 px LR size
    quiet_stage = D.StageConfig(sinc_prob=0.0, sigma=(0.2, 0.2), resize_probs=(0, 0, 1), gaussian_noise_prob=1.0,
                                noise_sigma=(0.0, 0.0), jpeg_quality=(100.0, 100.0), blur_prob=0.0)
    quiet = D.DegradationConfig(stage1=quiet_stage, stage2=quiet_stage, final_sinc_prob=0.0, usm_weight=0.0,
                                resize_modes=("area",))
    gt, lr = D.degrade(hr, quiet, seed=0)
    torch.testing.assert_close(gt, hr)
    # Near-identity degradation: the LR is close to an area downscale of the HR.
    ref = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    assert (lr - ref).abs().mean() < 0.03
    _, lr_default = D.degrade(hr, seed=0)
    assert (lr_default - ref).abs().mean() > (lr - ref).abs().mean()


def test_degrade_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        D.degrade(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        D.degrade(torch.rand(1, 1, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (training --degrade-on device)")
def test_degrade_on_cuda_matches_the_cpu():
    hr = _image(B=1, H=64, W=64, seed=4)
    for seed in range(6):
        gt_c, lr_c = D.degrade(hr, seed=seed)
        gt_g, lr_g = D.degrade(hr.cuda(), seed=seed)
        torch.testing.assert_close(gt_g.cpu(), gt_c, rtol=0, atol=1e-4)
        # LR is 8-bit quantised: a last-bit difference can flip a level, so compare the mean deviation
        assert (lr_g.cpu() - lr_c).abs().mean() < 2 / 255
