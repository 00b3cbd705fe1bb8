"""Faults and bad input: damaged or missing checkpoints fall back instead of starting over, leftovers are
removed, files get the umask's permissions, a full disk is a sentence, NaN / out-of-range pixels are refused for
every input type, argument types are taken as a user would pass them, and the CLI refuses name clashes and an
unusable output folder before computing anything."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import micro_model
from PIL import Image
from safetensors import SafetensorError

pytest.importorskip("diffusers")

from mfsr_fast import upscale  # noqa: E402
from mfsr_fast.io import images as imageio  # noqa: E402
from mfsr_fast.io.integrity import IntegrityError, check_folder, newest_checkpoint  # noqa: E402
from training import checkpoint as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(root, step, model, keep=3):
    return C.save_checkpoint(str(root), step, model=model, ema=model, config={}, keep=keep)


def _flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) - 5] ^= 0x10  # inside the tensor data, past the header
    open(path, "wb").write(bytes(data))


@pytest.fixture
def three(tmp_path):
    torch.manual_seed(0)
    m = micro_model()
    for s in (1, 2, 3):
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        _save(tmp_path, s, m)
    return tmp_path, m


def test_resume_falls_back_when_latest_names_a_deleted_folder(three):
    root, m = three
    shutil.rmtree(root / "step_00000003")
    said = []
    path = C.latest_checkpoint(str(root), report=said.append)
    assert path == str(root / "step_00000002")
    assert len(said) == 1 and "step_00000003" in said[0] and "missing" in said[0]
    # Training on from step 2 with keep=1 never rotates step 2 away before step 3 is whole.
    _save(root, 3, m, keep=1)
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_00000003"]
    check_folder(str(root / "step_00000003"), C.CHECKPOINT_FILES)


@pytest.mark.parametrize("damage", ["truncate", "flip", "latest_json", "drop_manifest_file"])
def test_damaged_newest_checkpoint_is_named_and_skipped(three, damage):
    root, _ = three
    newest = root / "step_00000003"
    weights = newest / "model" / "diffusion_pytorch_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
        want = "bytes"
    elif damage == "flip":
        _flip_a_bit(weights)  # same size: only the digest catches it
        want = "SHA-256"
    elif damage == "latest_json":
        (root / "latest.json").write_text('{"step": 3, "pa')
        shutil.rmtree(newest)
        want = "damaged"
    else:
        (newest / "rng.safetensors").unlink()
        want = "rng.safetensors"
    path, skipped = newest_checkpoint(str(root))
    assert path == str(root / "step_00000002")
    assert any(want in why for _, why in skipped), skipped
    if damage in ("truncate", "flip"):  # loading the damaged folder directly names the fault too
        with pytest.raises(IntegrityError, match="diffusion_pytorch_model.safetensors"):
            C.load_checkpoint(str(newest), model=micro_model(), restore_rng=False)


def test_legacy_checkpoint_without_manifest_is_checked_structurally(three):
    """A run from before manifests (no manifest anywhere, no format in trainer_state.json) is checked by structure;
    a manifest deleted from a checkpoint that was written with one is refused."""
    root, _ = three
    newest = root / "step_00000003"
    (newest / "manifest.json").unlink()
    path, skipped = newest_checkpoint(str(root))
    assert path == str(root / "step_00000002") and "manifest.json is missing" in skipped[0][1]
    for step in sorted(d for d in os.listdir(root) if d.startswith("step_")):  # as written before manifests
        state = json.load(open(root / step / "trainer_state.json"))
        del state["format"]
        json.dump(state, open(root / step / "trainer_state.json", "w"))
        (root / step / "manifest.json").unlink(missing_ok=True)
    assert newest_checkpoint(str(root))[0] == str(newest)  # whole: accepted
    w = newest / "ema" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1])
    path, skipped = newest_checkpoint(str(root))
    assert path == str(root / "step_00000002") and "truncated" in skipped[0][1]


def test_leftover_temporary_folders_are_removed_by_the_next_save(tmp_path):
    m = micro_model()
    left = tmp_path / ".tmp-step_00000005-abc"
    (left / "model").mkdir(parents=True)
    (left / "model" / "x.bin").write_bytes(b"0" * 1000)
    _save(tmp_path, 6, m)
    assert not left.exists()
    assert C.remove_partial(str(tmp_path)) == []


def test_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        m = micro_model()
        path = _save(tmp_path, 1, m)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(os.path.join(path, "model", "config.json")).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(tmp_path / "latest.json").st_mode) == 0o644
        out = tmp_path / "img.png"
        imageio.write_image(str(out), np.zeros((4, 4, 3), np.float32), imageio.ImageMeta())
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    """As the OS reports it, and as safetensors does (its I/O errors are SafetensorError, not OSError)."""
    m = micro_model()
    first = _save(tmp_path, 1, m)

    def full(*a, **k):
        raise error

    monkeypatch.setattr(C, "save_file", full)
    with pytest.raises(C.CheckpointWriteError, match=r"rng.safetensors: .*No space left.*MiB.*free"):
        _save(tmp_path, 2, m)
    assert C.latest_checkpoint(str(tmp_path)) == first
    assert [d for d in os.listdir(tmp_path) if d.startswith(".tmp")] == []


def test_one_pixel_check_for_every_input_type(model_dir):
    t = torch.rand(3, 8, 8)
    t[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        upscale(t, model=model_dir)
    with pytest.raises(ValueError, match="NaN"):
        upscale(t.permute(1, 2, 0).numpy(), model=model_dir)
    with pytest.raises(ValueError, match="divide by 255"):
        upscale(np.full((8, 8, 3), 200.0, np.float32), model=model_dir)
    with pytest.raises(ValueError, match="divide by 255"):
        upscale(torch.full((3, 8, 8), 200.0), model=model_dir)
    with pytest.warns(UserWarning, match="clipped"):
        upscale(np.full((8, 8, 3), 1.2, np.float32), model=model_dir)
    g = torch.rand(3, 8, 8, requires_grad=True)
    assert upscale(g, model=model_dir).shape == (3, 32, 32)


def test_arguments_as_users_pass_them(model_dir):
    x = np.zeros((8, 8, 3), np.uint8)
    a = upscale(x, model=model_dir, scale=np.float32(2), steps=np.int64(2))
    b = upscale(x, model=model_dir, scale=2.0, steps=2)
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="scale"):
        upscale(x, model=model_dir, scale=True)
    with pytest.raises(ValueError, match="steps"):
        upscale(x, model=model_dir, steps=True)
    assert upscale(x, model=model_dir, dtype="float32").dtype == np.uint8
    with pytest.raises(ValueError, match="dtype"):
        upscale(x, model=model_dir, dtype="int8")
    with pytest.raises(ValueError, match="not a device"):
        upscale(x, model=model_dir, device="tpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mfsr_fast", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_refuses_before_computing(model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    img.save(src / "x.jpg")
    img.save(src / "x.png")
    out = tmp_path / "out"
    r = _cli(src, "-o", out, "--ext", "png", "--overwrite", "--model", model_dir)
    assert r.returncode == 2 and "collide" in r.stderr and "x.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not os.listdir(out)
    r = _cli(src / "x.png", "-o", src / "x.jpg", "--model", model_dir)
    assert r.returncode == 2 and "is a file" in r.stderr
    r = _cli(src / "x.png", "-o", out, "--device", "tpu", "--model", model_dir)
    assert r.returncode == 2 and "not a device" in r.stderr and "Traceback" not in r.stderr
    # A broken symbolic link is reported (with or without -r), not skipped silently.
    os.symlink(tmp_path / "gone.png", src / "link.png")
    (src / "x.jpg").unlink()
    r = _cli(src, "-o", out, "--model", model_dir)
    assert r.returncode == 1 and "link.png" in r.stderr and "1 failed" in r.stderr


def test_cli_model_with_a_truncated_checkpoint_is_a_sentence(tmp_path):
    m = micro_model()
    run = tmp_path / "run"
    p = _save(run / "checkpoints", 1, m)
    w = os.path.join(p, "ema", "diffusion_pytorch_model.safetensors")
    open(w, "r+b").truncate(os.path.getsize(w) // 2)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    r = _cli(img, "-o", tmp_path / "o", "--model", run)
    assert r.returncode == 2 and "none of its checkpoints is whole" in r.stderr and "Traceback" not in r.stderr


def test_truncated_jpeg_is_refused_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    assert not imageio.jpeg_truncated(data)
    for cut in (2, 10, len(data) // 3):
        assert imageio.jpeg_truncated(data[:-cut])
    (tmp_path / "cut.jpg").write_bytes(data[:-2])
    with pytest.raises(imageio.ImageError, match="truncated"):
        imageio.read_image(str(tmp_path / "cut.jpg"))
    (tmp_path / "good.jpg").write_bytes(data)
    from training.data import ImageFolder

    with pytest.warns(UserWarning, match="truncated JPEG"):
        ds = ImageFolder(str(tmp_path), crop=16)
    assert ds.files == [str(tmp_path / "good.jpg")] and ds.skipped == [str(tmp_path / "cut.jpg")]


def test_training_with_an_empty_or_missing_folder_is_one_sentence(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "empty", tmp_path / "missing"):
        r = subprocess.run([sys.executable, "-m", "training.teacher", "--preset", "micro", "--data", str(data),
                            "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert str(data) in r.stderr and "teacher config" not in r.stdout


def test_resume_with_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    m = micro_model()
    p = _save(tmp_path / "run" / "checkpoints", 2, m)
    _flip_a_bit(os.path.join(p, "model", "diffusion_pytorch_model.safetensors"))
    from training.loop import _resume_point

    with pytest.raises(SystemExit, match="no checkpoint .* is whole"):
        _resume_point(str(tmp_path / "run" / "checkpoints"), True)
    assert os.path.isdir(p)  # nothing deleted
    assert json.load(open(tmp_path / "run" / "checkpoints" / "latest.json"))["step"] == 2


def test_out_of_memory_on_one_image_fails_that_image_and_the_batch_goes_on(model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from mfsr_fast.apps import cli
    from mfsr_fast.pipeline.pipeline import MFSRPipeline

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a_big.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "b.png")
    real = MFSRPipeline.upscale_array

    def flaky(self, arr, **kw):
        if flaky.calls == 0:
            flaky.calls += 1
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
        return real(self, arr, **kw)

    flaky.calls = 0
    monkeypatch.setattr(MFSRPipeline, "upscale_array", flaky)
    rc = cli.main([str(src), "-o", str(tmp_path / "out"), "--model", model_dir])
    err = capsys.readouterr().err
    assert rc == 1 and "a_big.png" in err and "out of memory" in err
    assert (tmp_path / "out" / "b_x4.png").exists()
