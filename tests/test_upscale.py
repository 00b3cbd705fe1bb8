"""mfsr_fast.upscale and the mfsr-upscale CLI: input and output types, image modes and depths, metadata, scale,
determinism, tiling, colour fix, and every kind of bad input (clear message, nothing lost)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from mfsr_fast import MFSRPipeline, SamplerConfig, TeacherSampling, upscale  # noqa: E402
from mfsr_fast.io import images as imageio  # noqa: E402
from mfsr_fast.pipeline.loading import DEFAULT_MODEL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_types_modes_and_sizes(model_dir, tmp_path):
    import mfsr_fast
    from mfsr_fast.pipeline import upscale as module

    assert mfsr_fast.upscale is module.upscale  # the documented entry point
    img = _photo()
    out = upscale(img, model=model_dir)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (80, 96, 3)
    grey = upscale(img[..., 0], model=model_dir)
    assert grey.shape == (80, 96)
    t = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    tout = upscale(t, model=model_dir)
    assert isinstance(tout, torch.Tensor) and tout.shape == (3, 80, 96) and tout.dtype == torch.float32
    assert np.abs(tout.permute(1, 2, 0).numpy() * 255 - out).max() <= 1.0  # same pixels through both paths
    pil = upscale(Image.fromarray(img).convert("L"), model=model_dir)
    assert isinstance(pil, Image.Image) and pil.mode == "L" and pil.size == (96, 80)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 77, np.uint8)], axis=2)
    ra = upscale(Image.fromarray(rgba, "RGBA"), model=model_dir)
    assert ra.mode == "RGBA" and abs(float(np.asarray(ra)[..., 3].mean()) - 77) < 1.0
    assert upscale(img, model=model_dir, scale=2.5).shape == (50, 60, 3)
    assert upscale(img, model=model_dir, scale=1).shape == (20, 24, 3)
    one = upscale(np.full((1, 1, 3), 128, np.uint8), model=model_dir)
    assert one.shape == (4, 4, 3)
    odd = upscale(_photo(7, 9), model=model_dir)
    assert odd.shape == (28, 36, 3)


def test_determinism_seed_steps_and_color_fix(model_dir):
    img = _photo()
    a = upscale(img, model=model_dir, seed=3, steps=2)
    b = upscale(img, model=model_dir, seed=3, steps=2)
    c = upscale(img, model=model_dir, seed=4, steps=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    plain = upscale(img, model=model_dir).astype(float)
    fixed = upscale(img, model=model_dir, color_fix="adain").astype(float)
    bic = np.asarray(Image.fromarray(img).resize((96, 80), Image.BICUBIC)).astype(float)
    err = lambda x: np.abs(x.mean((0, 1)) - bic.mean((0, 1))).max()  # noqa: E731
    assert err(fixed) <= err(plain) + 1e-6 and err(fixed) < 2.0
    wav = upscale(img, model=model_dir, color_fix="wavelet")
    assert wav.shape == plain.shape
    with pytest.raises(ValueError, match="color_fix"):
        upscale(img, model=model_dir, color_fix="magic")


def test_files_keep_depth_alpha_orientation_and_metadata(model_dir, tmp_path):
    import png

    # 16-bit RGBA PNG: Pillow alone would read it as 8-bit.
    rng = np.random.default_rng(1)
    a16 = (rng.uniform(0, 65535, (6, 8, 4))).astype(np.uint16)
    p16 = tmp_path / "deep.png"
    with open(p16, "wb") as f:
        png.Writer(8, 6, greyscale=False, alpha=True, bitdepth=16).write(f, a16.reshape(6, -1))
    out = upscale(str(p16), model=model_dir)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint16 and out.shape == (24, 32, 4)
    # EXIF orientation 6 (rotate 90): the output is upright; ICC and EXIF travel to the written file.
    img = Image.fromarray(_photo(12, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    icc = b"fake-icc-profile-bytes"
    pj = tmp_path / "cam.jpg"
    img.save(pj, exif=exif.tobytes(), icc_profile=icc, quality=95)
    res = upscale(str(pj), model=model_dir)
    assert res.size == (48, 80)  # stored 20 wide x 12 tall, orientation 6 -> upright 12 x 20, x4 -> (48, 80)
    assert res.info.get("icc_profile") == icc
    outdir = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mfsr_fast", str(pj), "-o", str(outdir), "--model", model_dir],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(outdir / "cam_x4.jpg") as im:
        assert im.size == (48, 80) and im.info.get("icc_profile") == icc
        ex = im.getexif()
        assert ex.get(0x010F) == "TestCam" and ex.get(0x0112, 1) == 1
    # A 16-bit PNG keeps its depth, ICC profile and EXIF through the written file too.
    deep = Image.fromarray((a16[..., 0]).astype(np.uint16))  # greyscale 16-bit ("I;16")
    p16i = tmp_path / "deepicc.png"
    ex16 = Image.Exif()
    ex16[0x010F] = "DeepCam"
    deep.save(p16i, icc_profile=icc, exif=ex16.tobytes())
    r = subprocess.run([sys.executable, "-m", "mfsr_fast", str(p16i), "-o", str(outdir), "--model", model_dir],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    w, h, _, info = png.Reader(filename=str(outdir / "deepicc_x4.png")).read()
    assert (w, h, info["bitdepth"], info["greyscale"]) == (32, 24, 16, True)
    with Image.open(outdir / "deepicc_x4.png") as im:
        assert im.info.get("icc_profile") == icc and im.getexif().get(0x010F) == "DeepCam"


def test_tiled_matches_untiled_away_from_borders():
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        pytest.skip("embedded default model not present")
    img = _photo(64, 64, seed=5)
    full = upscale(img, tile=64).astype(float)
    tiled = upscale(img, tile=32).astype(float)
    assert full.shape == tiled.shape == (256, 256, 3)
    inner = np.abs(full - tiled)[16:-16, 16:-16]
    assert inner.mean() < 3.0, inner.mean()  # out of 255: no seams


def test_a_pipelines_sampler_equals_a_folder_that_stores_it(model_dir, tmp_path):
    """The sampler is the pipeline's: one set on a pipeline, one saved in a folder's sampler_config.json and one given
    to the CLI as --sampler FILE.json give the same image; it changes steps 2 and up only; bad values are refused
    before anything runs."""
    import json

    pipe = MFSRPipeline.from_pretrained(model_dir)
    assert pipe.sampler == SamplerConfig()
    over_pipe = pipe.with_sampler(SamplerConfig(refine_t=0.3, jump="endpoint"))
    over_pipe.save_pretrained(str(tmp_path / "other"))
    assert json.load(open(tmp_path / "other" / "sampler_config.json"))["jump"] == "endpoint"
    img = _photo()
    own = upscale(img, model=model_dir, steps=2)
    over = upscale(img, model=over_pipe, steps=2)
    assert not np.array_equal(own, over)
    assert np.array_equal(over, upscale(img, model=str(tmp_path / "other"), steps=2))
    assert np.array_equal(upscale(img, model=over_pipe), upscale(img, model=model_dir))  # one step: the same
    half = upscale(img, model=pipe.with_sampler(SamplerConfig(jump="endpoint")), steps=2)  # the uniform grid kept
    assert not np.array_equal(half, own) and not np.array_equal(half, over)
    above = SamplerConfig(refine_t=0.3, jump="endpoint", refine_side="above")
    pipe.with_sampler(above).save_pretrained(str(tmp_path / "above"))
    three = upscale(img, model=pipe.with_sampler(above), steps=3)
    assert not np.array_equal(three, upscale(img, model=over_pipe, steps=3))
    assert np.array_equal(three, upscale(img, model=str(tmp_path / "above"), steps=3))
    for kw, what in (({"refine_t": 1.0}, "refine_t"), ({"refine_t": True}, "refine_t"), ({"jump": "magic"}, "jump"),
                     ({"refine_side": "left"}, "refine_side")):
        with pytest.raises(ValueError, match=what):
            SamplerConfig(**kw)
    Image.fromarray(img).save(tmp_path / "a.png")
    cli = [sys.executable, "-m", "mfsr_fast", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model",
           model_dir, "--steps", "2", "--dtype", "float32"]  # as the pipelines here run (conftest), whatever the CPU

    def sampler_file(values: dict) -> str:
        path = tmp_path / f"sampler{len(list(tmp_path.glob('sampler*')))}.json"
        path.write_text(json.dumps(values))
        return str(path)

    r = subprocess.run([*cli, "--sampler", sampler_file({"refine_t": 0.3, "jump": "endpoint"})], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "out" / "a_x4.png") as im:
        assert np.array_equal(np.asarray(im), over)
    r = subprocess.run([*cli, "--steps", "3", "--sampler", sampler_file(dataclasses.asdict(above)), "--suffix", "_3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "out" / "a_3.png") as im:
        assert np.array_equal(np.asarray(im), three)
    for bad, what in (({"refine_t": 1.5}, "refine_t must be in [0, 1)"), ({"tau": 0.5}, "has no field tau"),
                      ({"_class_name": "Euler"}, "unknown sampler 'Euler'")):
        r = subprocess.run([*cli, "--sampler", sampler_file(bad)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and what in r.stderr, r.stderr


def test_the_public_surface_is_short():
    """upscale() takes about ten keywords, the command line 15 options (besides --help and --version): the
    sampler's research settings live on the pipeline, and the web page is its own command."""
    import inspect

    from mfsr_fast.apps.cli import build_parser

    keywords = [p for p in inspect.signature(upscale).parameters if p != "image"]
    assert keywords == ["scale", "steps", "detail", "seed", "model", "device", "dtype", "tile", "color_fix",
                        "progress"]
    options = [a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "version")]
    assert len(options) == 15, [a.dest for a in options]


def test_bad_inputs_have_clear_messages(model_dir, tmp_path, monkeypatch):
    with pytest.raises(imageio.ImageError, match="no such file"):
        upscale(str(tmp_path / "missing.png"), model=model_dir)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(imageio.ImageError, match="not an image"):
        upscale(str(tmp_path / "text.png"), model=model_dir)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(imageio.ImageError, match="empty"):
        upscale(str(tmp_path / "empty.jpg"), model=model_dir)
    buf = io.BytesIO()
    Image.fromarray(_photo(40, 40)).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(imageio.ImageError, match="truncated or corrupt"):
        upscale(str(tmp_path / "trunc.png"), model=model_dir)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(_photo(20, 20)).save(tmp_path / "bomb.png")
    with pytest.raises(imageio.ImageError, match="decompression bomb"):
        upscale(str(tmp_path / "bomb.png"), model=model_dir)
    monkeypatch.undo()
    # Modes that are converted, not refused: palette, CMYK, LA; an animated GIF gives its first frame.
    base = Image.fromarray(_photo(10, 12))
    for mode, expect in (("P", "RGB"), ("CMYK", "RGB"), ("LA", "LA"), ("1", "L")):
        path = tmp_path / f"m_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        base.convert(mode).save(path)
        out = upscale(str(path), model=model_dir)
        assert out.mode == expect and out.size == (48, 40), (mode, out.mode)
    frames = [Image.fromarray(_photo(10, 12, seed=s)) for s in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    arr, meta = imageio.read_image(str(tmp_path / "anim.gif"))
    assert arr.shape[:2] == (10, 12) and "first frame" in meta.notes[0]
    with pytest.raises(ValueError, match="steps"):
        upscale(_photo(), model=model_dir, steps=0)
    with pytest.raises(ValueError, match="model"):
        upscale(_photo(), model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="numpy image"):
        upscale(np.zeros((4, 4, 7), np.uint8), model=model_dir)
    with pytest.raises(ValueError, match="image must be"):
        upscale(12, model=model_dir)


def test_cli_folder_failures_listed_and_inputs_never_overwritten(model_dir, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_photo()).save(src / "a.png")
    Image.fromarray(_photo(seed=2)).save(src / "sub" / "b.jpg")
    (src / "bad.png").write_text("not an image")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mfsr_fast", str(src), "-o", str(out), "--model", model_dir, "-r"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "1 failed" in r.stderr and "bad.png" in r.stderr
    assert (out / "a_x4.png").exists() and (out / "sub" / "b_x4.jpg").exists()
    with Image.open(out / "a_x4.png") as im:
        assert im.size == (96, 80)
    # Same folder, empty suffix: the input would be overwritten -> refused, input intact.
    before = (src / "a.png").read_bytes()
    r = subprocess.run([sys.executable, "-m", "mfsr_fast", str(src / "a.png"), "-o", str(src), "--suffix", "",
                        "--model", model_dir], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "overwrite an input" in r.stderr and (src / "a.png").read_bytes() == before
    # Unwritable output "folder" (under an existing file): refused before any image is computed, status 2.
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "mfsr_fast", str(src / "a.png"), "-o", str(blocker / "o"),
                        "--model", model_dir], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot create the output folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mfsr_fast", str(tmp_path / "nothing"), "--model", model_dir],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_demo_writes_outputs_comparisons_and_times(tmp_path):
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        pytest.skip("embedded default model not present")
    pytest.importorskip("skimage")
    from mfsr_fast.apps import demo
    from mfsr_fast.pipeline.upscale import cached_pipeline

    pipe = cached_pipeline("default")
    alt = demo.other_flat_detail(pipe)  # the default is restorer-conditioned: the other flat_detail than its own
    assert alt is not None and alt != pipe.sampler.flat_detail
    assert demo.main(["--output", str(tmp_path), "--photos", "chelsea", "--side", "128", "--figure",
                      str(tmp_path / "figure.png")]) == 0
    with Image.open(tmp_path / "figure.png") as im:  # LR | Real-ESRGAN | MFSR 1 step | original
        assert im.size == (4 * 128, 128)
    for name in ("chelsea_lr.png", "chelsea_bicubic.png", "chelsea_realesrgan.png", "chelsea_mfsr_1step.png",
                 f"chelsea_mfsr_1step_flat{alt:g}.png", "chelsea_mfsr_4step.png", "chelsea_comparison.png", "times.md"):
        assert (tmp_path / name).exists(), name
    with Image.open(tmp_path / "chelsea_comparison.png") as im:
        assert im.size == (7 * 128, 128)
    assert "Real-ESRGAN (s)" in (tmp_path / "times.md").read_text()
    assert f"MFSR 1 step, flat_detail {alt:g} (s)" in (tmp_path / "times.md").read_text()
    with Image.open(tmp_path / "chelsea_mfsr_1step.png") as a, \
            Image.open(tmp_path / f"chelsea_mfsr_1step_flat{alt:g}.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    with Image.open(tmp_path / "chelsea_mfsr_1step.png") as im:
        assert im.size == (128, 128)


def test_tiles_batched_per_call_give_the_same_image():
    """Several tiles per model call (the GPU default) equal one tile per call, for one image and for a batch of two,
    with a tile count the batch does not divide."""
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        pytest.skip("embedded default model not present")
    pipe = MFSRPipeline.from_pretrained("default", device="cpu")
    x = torch.from_numpy(_photo(40, 56, seed=6)).permute(2, 0, 1)[None].float() / 255
    for batch in (x, torch.cat([x, x.flip(-1)])):
        one = pipe.upscale_rgb(batch, tile=24, tile_batch=1)  # 2 x 3 tiles
        for group in (4, 6):
            many = pipe.upscale_rgb(batch, tile=24, tile_batch=group)
            torch.testing.assert_close(many, one, rtol=0, atol=1e-4)
    assert one.shape == (2, 3, 160, 224)


# upscale() with a folder that holds a student and its VAE.


def _vae_student_folder(tmp_path, with_vae=True):
    from conftest import randomize_
    from test_codec import _tiny_vae

    from mfsr_fast.models.transformer import MFSRTransformer

    torch.manual_seed(0)
    m = MFSRTransformer(in_channels=16, patch_size=2, num_layers=1, num_heads=2, head_dim=16, context_dim=24,
                        pooled_dim=8, sample_size=16, pos_embed_max_size=64, dual_attention_layers=(0,),
                        codec="sd3-vae", prediction="v")
    randomize_(m, std=0.05)
    g = torch.Generator().manual_seed(3)
    m.set_prompts(torch.randn(3, 5, 24, generator=g), torch.randn(3, 8, generator=g))
    folder = tmp_path / "student"
    m.save_pretrained(folder / "transformer")
    if with_vae:
        _tiny_vae().save_pretrained(folder / "vae")
    return folder


def test_upscale_through_the_vae_codec(tmp_path):
    folder = _vae_student_folder(tmp_path)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (18, 23, 3), dtype=np.uint8)  # odd sizes: padded to multiples of 4
    out = upscale(img, model=str(folder))
    assert out.shape == (72, 92, 3) and out.dtype == np.uint8 and out.std() > 0
    np.testing.assert_array_equal(upscale(img, model=str(folder)), out)  # deterministic for a seed
    assert not np.array_equal(upscale(img, model=str(folder), seed=1), out)
    two = upscale(img, model=str(folder), steps=2)
    assert two.shape == out.shape
    # Tiled in LR space (tiles of 8 LR px = 32 px through the VAE): same size, finite, and the same image where a
    # single tile covers it all.
    pipe = MFSRPipeline.from_pretrained(str(folder))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    whole = pipe.upscale_rgb(x, tile=64)
    tiled = pipe.upscale_rgb(x, tile=8, overlap=4)
    assert tiled.shape == whole.shape == (1, 3, 72, 92) and torch.isfinite(tiled).all()
    torch.testing.assert_close(pipe.upscale_rgb(x, tile=24), whole)
    taught = pipe.with_sampler(TeacherSampling(guidance=3.0)).upscale_rgb(x, steps=2)
    assert taught.shape == whole.shape


def test_vae_model_without_its_vae_is_a_clear_error(tmp_path):
    folder = _vae_student_folder(tmp_path, with_vae=False)
    with pytest.raises(ValueError, match="uses the SD3 VAE, but there is no vae/ folder"):
        upscale(torch.rand(3, 8, 8), model=str(folder))
