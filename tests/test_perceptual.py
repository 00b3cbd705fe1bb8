"""LPIPS and DISTS (mfsr_fast.perceptual) with stand-in weight files of the real formats: the VGG16 trunk against an
independent layer-by-layer evaluation of torchvision's state dict, the measures' defining properties, the evaluation
columns, and clear messages for missing or foreign weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfsr_fast.evaluation import perceptual

CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision VGG16 'features' conv indices
STAGE_END = (2, 7, 14, 21, 28)  # the conv whose ReLU ends each stage


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder of stand-in files in the real formats: torchvision's VGG16 state dict (random, with its classifier
    keys), LPIPS v0.1 layer weights and DISTS alpha / beta."""
    d = tmp_path_factory.mktemp("perceptual")
    g = torch.Generator().manual_seed(0)
    sd, c = {}, 3
    for i, v in zip(CONVS, [x for x in perceptual._VGG16 if x != "M"]):
        sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.01
        c = v
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has the classifier too: ignored
    torch.save(sd, d / perceptual.VGG16_FILE)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, ch, 1, 1, generator=g)
                for i, ch in enumerate(perceptual.CHANNELS)}, d / perceptual.LPIPS_FILE)
    n = 3 + sum(perceptual.CHANNELS)
    torch.save({"alpha": torch.rand(1, n, 1, 1, generator=g), "beta": torch.rand(1, n, 1, 1, generator=g)},
               d / perceptual.DISTS_FILE)
    return d, sd


def _images(seed=0, n=40):
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 1, (1, 3, n // 4, n // 4))).float()
    return F.interpolate(small, size=(n, n), mode="bicubic", align_corners=False).clamp(0, 1)


def test_vgg16_trunk_matches_torchvision_layout(weights):
    d, sd = weights
    net = perceptual.VGG16Stages().load_vgg16(str(d / perceptual.VGG16_FILE))
    x = torch.randn(1, 3, 32, 32)
    got = net(x)
    h, expect = x, []
    for i in CONVS:
        if i - 1 in (4, 9, 16, 23):  # a max pool precedes this conv
            h = F.max_pool2d(h, 2)
        h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        if i in STAGE_END:
            expect.append(h)
    assert [tuple(a.shape) for a in got] == [tuple(b.shape) for b in expect]
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_lpips_and_dists_properties(weights):
    d, _ = weights
    lp = perceptual.LPIPS(str(d / perceptual.VGG16_FILE), str(d / perceptual.LPIPS_FILE))
    ds = perceptual.DISTS(str(d / perceptual.VGG16_FILE), str(d / perceptual.DISTS_FILE))
    a = _images(0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(a.shape, generator=g)
    for net in (lp, ds):
        assert net(a, a).abs().max() < 1e-5  # identical images: 0
        scores = [net(a, (a + s * noise).clamp(0, 1)).item() for s in (0.02, 0.1, 0.3)]
        assert 0 < scores[0] < scores[1] < scores[2], scores  # more distortion, larger distance
        b = (a + 0.1 * noise).clamp(0, 1)
        torch.testing.assert_close(net(a, b), net(b, a), rtol=1e-4, atol=1e-6)  # symmetric
    # DISTS is one minus a convex combination of similarities in [0, 1] for non-negative features
    assert 0 <= ds(a, _images(5)).item() <= 1


def test_perceptual_columns_in_evaluate_and_clear_messages(weights, tmp_path):
    from PIL import Image

    from mfsr_fast.evaluation import cli as evaluate

    d, _ = weights
    (tmp_path / "HR").mkdir()
    (tmp_path / "LR").mkdir()
    hr = Image.fromarray((_images(2, 48)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    hr.save(tmp_path / "HR" / "a.png")
    hr.resize((12, 12), Image.BICUBIC).save(tmp_path / "LR" / "a.png")
    out = tmp_path / "t.md"
    assert evaluate.main(["--data", str(tmp_path), "--methods", "bicubic", "--perceptual-weights", str(d),
                          "--output", str(out)]) == 0
    header, _, row = out.read_text().strip().splitlines()[-3:]
    assert header.endswith("| LPIPS | DISTS |")
    lpips, dists = (float(v) for v in row.strip("| ").split("|")[-2:])
    assert lpips > 0 and 0 < dists < 1
    assert evaluate.main(["--data", str(tmp_path), "--methods", "bicubic", "--dists", "--perceptual-weights", str(d),
                          "--output", str(out)]) == 0
    assert out.read_text().strip().splitlines()[-3].endswith("| NIQE | DISTS |")
    with pytest.raises(SystemExit, match="vgg16-397923af.pth"):  # asked for without the files: where they come from
        evaluate.main(["--data", str(tmp_path), "--lpips"])
    with pytest.raises(SystemExit, match="missing vgg16-397923af.pth, vgg.pth, weights.pt"):
        evaluate.main(["--data", str(tmp_path), "--perceptual-weights", str(tmp_path / "HR")])
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (perceptual.VGG16_FILE, perceptual.LPIPS_FILE, perceptual.DISTS_FILE):
        (bad / f).write_text("not weights")
    with pytest.raises(SystemExit, match="not a readable weight file"):
        evaluate.main(["--data", str(tmp_path), "--perceptual-weights", str(bad)])
    with pytest.raises(ValueError, match="one size"):
        perceptual.Perceptual(str(d), measures=["lpips"])(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
