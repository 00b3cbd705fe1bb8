"""PSNR / SSIM conventions and NIQE: conformance against MATLAB's value on ../shared/data/metrics/baboon.png, and
the properties the measures must have."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mfsr_fast.evaluation import metrics
from mfsr_fast.pipeline.texture import local_texture
from mfsr_fast.sampling.config import TeacherSampling


def _img(seed=0, h=200, w=210):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_niqe_matches_matlab_on_the_conformance_image(shared_data):
    params = metrics.load_niqe_params(os.path.join(shared_data, "metrics", "niqe_pris_params.npz"))
    img = np.asarray(Image.open(os.path.join(shared_data, "metrics", "baboon.png")).convert("RGB"))
    assert metrics.niqe_rgb(img, params) == pytest.approx(5.7296, abs=0.01)


def test_niqe_ranks_noise_as_less_natural(shared_data):
    params = metrics.load_niqe_params(os.path.join(shared_data, "metrics", "niqe_pris_params.npz"))
    img = np.asarray(Image.open(os.path.join(shared_data, "metrics", "baboon.png")).convert("RGB"))[:192, :192]
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert metrics.niqe_rgb(noisy, params) > metrics.niqe_rgb(img, params) + 1.0


def test_niqe_params_missing_says_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="BasicSR"):
        metrics.load_niqe_params(None)
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.load_niqe_params(str(tmp_path / "none.npz"))


def test_psnr_ssim_conventions():
    a = _img()
    assert metrics.psnr(a, a) == float("inf") and metrics.ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 4, 0, 255).astype(np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 16), abs=0.05)
    # The border crop ignores the 4-pixel frame: damage there changes nothing.
    c = a.copy()
    c[:4] = 0
    assert metrics.psnr(a, c) == float("inf")
    assert metrics.psnr(a, b, y=True) > metrics.psnr(a, b)  # a +4 offset is 3.4 in luma
    y = metrics.rgb_to_y(np.array([[[255, 255, 255], [0, 0, 0]]]))
    np.testing.assert_allclose(y, [[235.0, 16.0]])


def test_texture_ratios_see_grain_on_flat_areas_and_blur_on_busy_ones():
    """A photo nearly flat on its left half (a faint grain) and finely textured on its right: the photo itself gives
    (1, 1); noise added on the flat half raises the flat ratio, not the busy one; a blur lowers the busy ratio; the
    images must match in shape."""
    rng = np.random.default_rng(0)
    hr = 120.0 + rng.normal(0, 1.5, (64, 64, 1)).repeat(3, axis=2)
    hr[:, 32:] += rng.normal(0, 20, (64, 32, 1))
    hr = hr.clip(0, 255).round().astype(np.uint8)
    assert metrics.texture_ratios(hr, hr) == pytest.approx((1.0, 1.0))
    grain = hr.astype(np.float64)
    grain[:, :24] += rng.normal(0, 4, (64, 24, 1))
    flat, busy = metrics.texture_ratios(grain.clip(0, 255).round().astype(np.uint8), hr)
    assert flat > 2 and busy == pytest.approx(1.0, abs=0.02)
    blurred = np.asarray(Image.fromarray(hr).resize((16, 16), Image.BOX).resize((64, 64), Image.BICUBIC))
    flat, busy = metrics.texture_ratios(blurred, hr)
    assert busy < 0.5 and flat < 1
    assert metrics.texture_ratios(hr, hr, border=4) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="different shapes"):
        metrics.texture_ratios(hr[:32], hr)
    with pytest.raises(ValueError, match="more than 4.5 px"):
        metrics.texture_ratios(hr, hr, border=30)


def test_matlab_imresize_half():
    # MATLAB: imresize(magic-free ramp, 0.5) of a linear ramp is the ramp at the new sample centres.
    x = np.tile(np.arange(16, dtype=np.float64), (16, 1))
    out = metrics.imresize(x, 0.5)
    assert out.shape == (8, 8)
    np.testing.assert_allclose(out[:, 2:-2], np.tile(np.arange(0.5, 16, 2)[2:-2], (8, 1)), atol=1e-9)


def test_evaluate_command_on_generated_pairs(tmp_path, capsys):
    from mfsr_fast.evaluation import cli as evaluate
    from mfsr_fast.evaluation.methods import parse_method
    from mfsr_fast.evaluation.runner import pairs

    (tmp_path / "HR").mkdir()
    (tmp_path / "LR").mkdir()
    for i in range(2):
        hr = Image.fromarray(_img(i, 96, 96))
        hr.save(tmp_path / "HR" / f"img_{i}_HR.png")
        hr.resize((24, 24), Image.BICUBIC).save(tmp_path / "LR" / f"img_{i}_LR.png")
    assert [os.path.basename(h) for h, _ in pairs(str(tmp_path))] == ["img_0_HR.png", "img_1_HR.png"]
    out = tmp_path / "table.md"
    assert evaluate.main(["--data", str(tmp_path), "--methods", "bicubic", "--output", str(out)]) == 0
    table = out.read_text()
    assert "| bicubic | 0 |" in table and "2 images" in table
    psnr = float(table.strip().splitlines()[-1].split("|")[4])
    assert 20 < psnr < 60
    with pytest.raises(SystemExit, match="HR/ and LR/"):
        evaluate.main(["--data", str(tmp_path / "HR")])
    # The second pair alone, its output kept as a picture and its numbers per image.
    shots, csv_path = tmp_path / "shots", tmp_path / "rows" / "per_image.csv"
    assert evaluate.main(["--data", str(tmp_path), "--methods", "bicubic", "--skip", "1", "--save-images",
                          str(shots), "--per-image", str(csv_path), "--output", str(out)]) == 0
    assert "1 images" in out.read_text()
    saved = np.asarray(Image.open(shots / "bicubic" / "img_1_HR.png"))
    expect = np.asarray(Image.open(tmp_path / "LR" / "img_1_LR.png").resize((96, 96), Image.BICUBIC))
    np.testing.assert_array_equal(saved, expect)
    rows = csv_path.read_text().strip().splitlines()
    assert rows[0] == "image,method,nfe,seconds,psnr,ssim,psnr_y,ssim_y,tex_flat,tex_busy" and len(rows) == 2
    name, method, nfe, _, psnr1, *_ = rows[1].split(",")
    assert (name, method, nfe) == ("img_1_HR", "bicubic", "0")
    assert float(psnr1) == pytest.approx(float(out.read_text().strip().splitlines()[-1].split("|")[4]), abs=0.006)
    with pytest.raises(SystemExit, match="no pairs left"):
        evaluate.main(["--data", str(tmp_path), "--methods", "bicubic", "--skip", "2"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--save-images .*cannot create"):
        evaluate.main(["--data", str(tmp_path), "--methods", "bicubic",
                       "--save-images", str(tmp_path / "a_file" / "x")])
    # Method names are checked before any model loads; a guidance without its "cfg" prefix is refused, not ignored.
    for bad in ("teacher:40:1.5", "student:x", "bicubic:2", "magic"):
        with pytest.raises(SystemExit, match="unknown method"):
            evaluate.main(["--data", str(tmp_path), "--methods", f"bicubic,{bad}"])
    for bad in ("teacher:40:cfg1.5:cfg2", "teacher:0", "teacher:4:refine1.5", "teacher:4:above2", "teacher:4:fast",
                "student:0", "student:2:refine1", "student:2:endpoint:average", "student:2:fast", "teacher:2:endpoint"):
        with pytest.raises(SystemExit, match="unknown method"):
            parse_method(bad)
    plain = parse_method("teacher:40:cfg1.5")
    assert plain[:2] == ("teacher", 40) and plain[2] == TeacherSampling(guidance=1.5) and plain[2].nfe(40) == 80
    kind, steps, how = parse_method("teacher:40:cfg1.5:refine0.5:above0.5")
    assert (kind, steps, how) == ("teacher", 40, TeacherSampling(guidance=1.5, refine_t=0.5, interval=(0.5, 1.0)))
    assert how.nfe(40) == 41  # only the step from t = 1 lies above 0.5 on that grid: two passes there, one elsewhere
    # A student's options replace only what they name; the rest stays the model's own.
    assert parse_method("student:2") == ("student", 2, {})
    assert parse_method("student:4:endpoint") == ("student", 4, {"jump": "endpoint"})
    assert parse_method("student:2:refine0.25:endpoint") == ("student", 2, {"refine_t": 0.25,
                                                                                      "jump": "endpoint"})
    assert parse_method("student:4:refine0.7:endpoint:above") == (
        "student", 4, {"refine_t": 0.7, "jump": "endpoint", "refine_side": "above"})
    for bad in ("student:4:above:below", "student:4:sideways", "student:4:above0.5"):
        with pytest.raises(SystemExit, match="unknown method"):
            parse_method(bad)
    # Named students (--student NAME=FOLDER) take the student's options; unknown names and reserved ones are refused.
    assert parse_method("grown:2:endpoint", {"grown"}) == ("grown", 2, {"jump": "endpoint"})
    with pytest.raises(SystemExit, match="unknown method"):
        parse_method("grown:2")
    for bad in ("grown", "teacher=x", "student=x", "2x=y", "a=", "a=x,a=y"):
        with pytest.raises(SystemExit, match="give NAME=FOLDER"):
            evaluate.main(["--data", str(tmp_path), "--methods", "bicubic"]
                          + [a for spec in bad.split(",") for a in ("--student", spec)])


def test_evaluate_a_dit4sr_teacher_with_prompts_and_vae(tmp_path):
    import numpy as np
    from PIL import Image
    from test_dit4sr_checkpoints import dit4sr_kit

    from mfsr_fast.evaluation import cli as evaluate

    folder, vae, prompts = dit4sr_kit(tmp_path)
    data = tmp_path / "pairs"
    (data / "HR").mkdir(parents=True)
    (data / "LR").mkdir()
    hr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hr.save(data / "HR" / "a_HR.png")
    hr.resize((16, 16), Image.BICUBIC).save(data / "LR" / "a_LR.png")
    out = tmp_path / "table.md"
    args = ["--data", str(data), "--teacher", str(folder), "--methods", "teacher:1,teacher:2:cfg8.0"]
    assert evaluate.main([*args, "--prompts", prompts, "--vae", vae, "--output", str(out)]) == 0
    table = out.read_text()
    assert "| teacher:1 | 1 |" in table and "| teacher:2:cfg8.0 | 4 |" in table
    with pytest.raises(SystemExit, match="pass --prompts"):
        evaluate.main([*args, "--vae", vae])
    with pytest.raises(SystemExit, match="pass --vae"):
        evaluate.main([*args, "--prompts", prompts])


def test_local_texture_sees_fine_detail_not_flat_or_smooth_areas():
    flat = torch.full((1, 3, 32, 32), 0.4)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)  # smooth: no fine detail
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    busy = (0.5 + 0.1 * ((x + y) % 2 * 2 - 1).float()).expand(1, 3, 32, 32)  # a one-pixel checkerboard
    assert local_texture(flat, 5).abs().max() < 1e-12
    assert local_texture(ramp, 5)[..., 8:24, 8:24].max() < 1e-6
    assert local_texture(busy, 5)[..., 8:24, 8:24].min() > 1e-3
    assert local_texture(busy, 5).shape == (1, 1, 32, 32)
