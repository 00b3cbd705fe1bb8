"""Nothing lost, nothing silently wrong, for the upscaler: metadata that describes the photo (not the file's layout),
one pixel rule for files and arrays, models that are whole or refused in one sentence, output problems found before
the upscale, batches that can be run again, and library arguments checked with a sentence."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from mfsr_fast import upscale  # noqa: E402
from mfsr_fast.apps import cli  # noqa: E402
from mfsr_fast.io import images as imageio  # noqa: E402
from mfsr_fast.pipeline.upscale import clear_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _photo(h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mfsr_fast", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# Metadata and pixel ranges (items 4 and 5).


def test_tiff_outputs_carry_the_photos_tags_not_the_files_layout(model_dir, tmp_path):
    """A TIFF's own layout tags (size, strips, compression) were carried as EXIF into a 4x larger output: the TIFF
    writer refused them after the whole upscale, and a PNG output kept the stale width and strip tags."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0132] = "Canon", "2026:01:02 03:04:05"
    Image.fromarray(_photo()).save(tmp_path / "photo.tif", exif=exif, compression="tiff_lzw")
    for ext in ("", "png", "jpg"):
        out = tmp_path / f"out{ext}"
        r = _cli(tmp_path / "photo.tif", "-o", out, "--model", model_dir, *(("--ext", ext) if ext else ()))
        assert r.returncode == 0, r.stderr
        (written,) = os.listdir(out)
        with Image.open(out / written) as im:
            assert im.size == (96, 80)
            tags = im.getexif()
            assert tags[0x010F] == "Canon" and tags[0x0132] == "2026:01:02 03:04:05"
            if ext:  # a TIFF writes its own layout tags for its own pixels; others carry none
                assert not set(tags) & {0x0100, 0x0101, 0x0111, 0x0116, 0x0117, 0x0103}


def test_float_and_32bit_tiffs_follow_the_librarys_pixel_rule(model_dir, tmp_path):
    """A float TIFF of 0-255 values came out nearly white while the library refuses such arrays with a sentence;
    32-bit integer pixels are read as 16-bit values, and 0-255 ones are refused as ambiguous."""
    grey = _photo()[..., 0]
    Image.fromarray(grey.astype(np.float32), "F").save(tmp_path / "f255.tif")
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "f01.tif")
    Image.fromarray(grey.astype(np.int32), "I").save(tmp_path / "i255.tif")
    Image.fromarray(grey.astype(np.int32) * 257, "I").save(tmp_path / "i16.tif")
    with pytest.raises(ValueError, match="divide by 255") as lib:
        upscale(grey.astype(np.float32), model=model_dir)
    with pytest.raises(imageio.ImageError, match="divide by 255") as file:
        imageio.read_image(str(tmp_path / "f255.tif"))
    assert str(file.value).split(": ", 1)[1] == str(lib.value).replace("numpy image", "image")
    with pytest.raises(imageio.ImageError, match="ambiguous"):
        imageio.read_image(str(tmp_path / "i255.tif"))
    a, _ = imageio.read_image(str(tmp_path / "f01.tif"))
    b, meta = imageio.read_image(str(tmp_path / "i16.tif"))
    assert meta.bits == 16 and np.abs(a - grey[..., None] / 255).max() < 1e-6 and np.abs(a - b).max() < 1e-6


def _cmyk_profile() -> bytes:
    """A header-only ICC profile of the CMYK colour space (no tags: littlecms can read it but not convert with it)."""
    head = struct.pack(">I4sI4s4s4s12s4s4sI4s4sQI12s4s16s28s", 132, b"lcms", 0x02100000, b"prtr", b"CMYK", b"Lab ",
                       b"\0" * 12, b"acsp", b"APPL", 0, b"\0" * 4, b"\0" * 4, 0, 0,
                       struct.pack(">iii", 63190, 65536, 54061), b"\0" * 4, b"\0" * 16, b"\0" * 28)
    return head + struct.pack(">I", 0)


def test_a_cmyk_jpeg_gives_rgb_without_its_cmyk_profile(tmp_path):
    icc = _cmyk_profile()
    assert ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip() == "CMYK"
    cmyk = np.random.default_rng(0).integers(0, 255, (12, 16, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", icc_profile=icc)
    arr, meta = imageio.read_image(str(tmp_path / "c.jpg"))
    assert arr.shape == (12, 16, 3) and meta.icc_profile is None and "to RGB" in " ".join(meta.notes)
    rgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(cmyk[..., :3], "RGB").save(tmp_path / "rgb.jpg", icc_profile=rgb_icc)
    assert imageio.read_image(str(tmp_path / "rgb.jpg"))[1].icc_profile == rgb_icc  # an RGB profile travels


# Models (items 6 and 10).


def _bad_model(model_dir, root, kind) -> str:
    d = os.path.join(root, kind)
    shutil.copytree(model_dir, d)
    sd = load_file(os.path.join(d, WEIGHTS))
    key = sorted(sd)[3]
    if kind == "nan":
        sd[key] = torch.full_like(sd[key], float("nan"))
    elif kind == "missing":
        del sd[key]
    elif kind == "shape":
        sd[key] = torch.zeros(sd[key].numel() + 1)
    if kind in ("nan", "missing", "shape"):
        save_file(sd, os.path.join(d, WEIGHTS))
    elif kind == "header":
        data = bytearray(open(os.path.join(d, WEIGHTS), "rb").read())
        data[12:20] = b"\xff" * 8
        open(os.path.join(d, WEIGHTS), "wb").write(bytes(data))
    elif kind == "config":
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["num_layers"] = "two"
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    elif kind == "pickle":
        os.remove(os.path.join(d, WEIGHTS))
        torch.save(sd, os.path.join(d, "diffusion_pytorch_model.bin"))
    return d


@pytest.mark.parametrize("kind, says", [
    ("nan", "NaN or infinity"), ("missing", "lack 1 tensor"), ("shape", "size mismatch"),
    ("header", "damaged safetensors header"), ("config", "config.json does not describe"),
    ("pickle", "pickle file, which is never loaded")])
def test_a_faulty_model_folder_is_one_sentence_and_nothing_is_written(model_dir, tmp_path, kind, says):
    """NaN weights wrote a black image with exit 0, a missing tensor ran freshly initialised; a wrong shape, a damaged
    header, a config value of the wrong type or a pickle file printed a long traceback."""
    bad = _bad_model(model_dir, str(tmp_path), kind)
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    r = _cli(tmp_path / "in.png", "-o", tmp_path / "out", "--model", bad)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "out" / "in_x4.png")


def test_tile_size_and_seed_are_what_the_output_depends_on(model_dir):
    """The docs say what holds: one call's output is the same every time; another tile size changes it."""
    img = _photo(40, 44)
    a = upscale(img, model=model_dir, tile=16, seed=3)
    assert np.array_equal(a, upscale(img, model=model_dir, tile=16, seed=3))
    assert not np.array_equal(a, upscale(img, model=model_dir, tile=24, seed=3))
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "depends on the tile size" in usage and "whatever the tile" not in readme


# Batches (items 8, 11 and 12).


def test_a_damaged_16bit_png_fails_that_file_only(model_dir, tmp_path):
    """A 16-bit PNG Pillow opens but pypng rejects (a malformed sBIT chunk) raised png.FormatError: the batch
    stopped."""
    import png

    buf = io.BytesIO()
    png.Writer(6, 5, greyscale=True, bitdepth=16).write(buf, np.full((5, 6), 30000, np.uint16).tolist())
    chunks = list(png.Reader(bytes=buf.getvalue()).chunks())
    bad = io.BytesIO()
    png.write_chunks(bad, chunks[:1] + [(b"sBIT", b"\x00\x00\x00\x00")] + chunks[1:])
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_bad.png").write_bytes(bad.getvalue())
    Image.fromarray(_photo()).save(src / "b_good.png")
    r = _cli(src, "-o", tmp_path / "out", "--model", model_dir)
    assert r.returncode == 1 and "a_bad.png" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp_path / "out") == ["b_good_x4.png"]


def test_output_problems_are_found_before_the_upscale(model_dir, tmp_path, monkeypatch):
    """A WebP too wide, an output name that is a folder (with --overwrite), a --suffix that walks out of -o: each was
    found only after computing (or wrote outside -o)."""
    Image.fromarray(_photo(20, 24)).save(tmp_path / "in.png")
    calls = []
    from mfsr_fast.pipeline.pipeline import MFSRPipeline

    real = MFSRPipeline.upscale_array
    monkeypatch.setattr(MFSRPipeline, "upscale_array", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "in.png"), "-o", str(out), "--model", model_dir, "--ext", "webp",
                     "--scale", "16"]) == 0  # 384 px: fits
    (out / "in_x4.png").mkdir()
    assert cli.main([str(tmp_path / "in.png"), "-o", str(out), "--model", model_dir, "--overwrite"]) == 1
    assert cli.main([str(tmp_path / "in.png"), "-o", str(out), "--model", model_dir, "--suffix", "/../x"]) == 2
    assert not (tmp_path / "x.png").exists()
    assert len(calls) == 1
    from mfsr_fast.apps.files import ImageError, check_output

    with pytest.raises(ImageError, match="larger than WEBP holds"):
        check_output(str(out / "big.webp"), (16384, 100), overwrite=False)


def test_a_batch_run_again_finishes_what_is_left(model_dir, tmp_path, capsys):
    """With -o equal to the input folder a rerun upscaled its own outputs again (one_x4_x4.png) and exited 1; a rerun
    after an interruption listed the finished files as failures; a killed run's .part file stayed."""
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("one", "two"):
        Image.fromarray(_photo(seed=len(name))).save(src / f"{name}.png")
    assert cli.main([str(src), "-o", str(src), "--model", model_dir]) == 0
    (src / ".mfsr-999999999-abc123.part").write_bytes(b"half")  # a writer that is gone
    live = src / f".mfsr-{os.getpid()}-live.part"
    live.write_bytes(b"being written")
    before = {p: os.path.getmtime(src / p) for p in os.listdir(src)}
    capsys.readouterr()
    assert cli.main([str(src), "-o", str(src), "--model", model_dir]) == 0
    said = capsys.readouterr()
    assert "left out 2 earlier output(s)" in said.out and "2 skipped" in said.out and "failed" not in said.err
    assert sorted(os.listdir(src)) == sorted([live.name, "one.png", "one_x4.png", "two.png", "two_x4.png"])
    assert all(os.path.getmtime(src / p) == t for p, t in before.items() if p in os.listdir(src))
    tree = tmp_path / "tree"  # an output folder inside the input folder, with -r
    (tree / "a").mkdir(parents=True)
    shutil.copy(src / "one.png", tree / "a" / "one.png")
    sub = tree / "upscaled"
    assert cli.main([str(tree), "-r", "-o", str(sub), "--model", model_dir]) == 0
    assert cli.main([str(tree), "-r", "-o", str(sub), "--model", model_dir]) == 0
    assert os.listdir(sub) == ["a"] and os.listdir(sub / "a") == ["one_x4.png"]


def test_ctrl_c_prints_a_summary_not_a_traceback(model_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_photo(seed=i)).save(src / f"p{i}.png")
    from mfsr_fast.apps import files

    real, n = files.upscale_file, []

    def interrupt_second(*a, **k):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cli, "upscale_file", interrupt_second)
    assert cli.main([str(src), "-o", str(tmp_path / "out"), "--model", model_dir]) == 130
    out = capsys.readouterr().out
    assert "interrupted: 1 image(s) written" in out and "2 not done" in out
    assert os.listdir(tmp_path / "out") == ["p0_x4.png"]


# Library arguments (item 14).


@pytest.mark.parametrize("kw, says", [
    (dict(tile="64"), "tile must be"), (dict(tile=0), "tile must be"), (dict(tile=-32), "tile must be"),
    (dict(seed=1.5), "seed must be an integer"), (dict(seed="1"), "seed must be an integer"),
    (dict(progress="yes"), "progress must be")])
def test_bad_call_arguments_are_a_sentence_before_any_work(kw, says):
    clear_cache()
    with pytest.raises(ValueError, match=says):
        upscale(np.zeros((8, 8, 3), np.uint8), model="/no/such/folder", **kw)  # refused before the model loads


def test_empty_images_are_refused_with_a_sentence(model_dir):
    for bad in (np.zeros((0, 0), np.uint8), np.zeros((0, 5, 3), np.float32), torch.zeros(0, 3, 8, 8),
                torch.zeros(3, 0, 8)):
        with pytest.raises(ValueError, match="empty"):
            upscale(bad, model=model_dir)
    assert cli.main(["x.png", "--tile", "0"]) == 2


# Training data (item 9) and the web page (item 13).


def test_a_decompression_bomb_in_the_training_data_is_skipped_like_any_unreadable_file(tmp_path, monkeypatch):
    from training.data import ImageFolder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    for i in range(2):
        Image.fromarray(_photo(40, 40, seed=i)).save(tmp_path / f"ok{i}.png")
    Image.fromarray(_photo(100, 100)).save(tmp_path / "bomb.png")  # 10000 px: over twice the limit
    with pytest.warns(UserWarning, match="skipping unreadable image .*bomb.png"):
        data = ImageFolder(str(tmp_path), crop=16)
    assert len(data) == 2 and data.skipped == [str(tmp_path / "bomb.png")]
    assert data[0].shape == (3, 16, 16)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_web_page_says_a_port_is_taken_and_cleans_up_on_sigterm(model_dir, tmp_path):
    """SIGTERM left /tmp/mfsr-web-* (users' results) behind; a port already in use was a traceback."""
    import signal
    import socket
    import time

    pytest.importorskip("gradio")
    env = dict(os.environ, TMPDIR=str(tmp_path), GRADIO_ANALYTICS_ENABLED="False")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "mfsr_fast.apps.web", "--model", model_dir, "--port",
                            str(taken.getsockname()[1])], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mfsr_fast.apps.web", "--model", model_dir, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    work = [d for d in os.listdir(tmp_path) if d.startswith("mfsr-web-")]
    assert len(work) == 1
    (tmp_path / work[0] / "result.png").write_bytes(b"a user's result")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / work[0]).exists()
