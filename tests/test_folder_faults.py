"""Fault injection through the real command lines, for the folders the tools write as a whole: an export (or a
restorer conversion) never deletes what it did not write and never writes into its own input; an exported folder is
checked against its manifest; a training folder holds one run, whose settings change on --resume only when named,
and whose log stays one history."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from test_restorer import _net, write_ncnn  # noqa: E402

from mfsr_fast.models import ncnn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)


def _teacher(data, out, *extra):
    return _run("training.teacher", "--preset", "micro", "--data", data, "--output-dir", out, "--threads", "1",
                *extra)


def _tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what 'nothing else was touched' compares."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(4):
        small = rng.uniform(0, 255, (6, 7, 3)).astype(np.uint8)
        Image.fromarray(small).resize((48 + 4 * i, 40), Image.BICUBIC).save(d / f"im{i}.png")
    return str(d)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("work") / "run"
    res = _teacher(data, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# Export and conversion: never delete what the tool did not write.


def test_export_refuses_a_folder_of_the_users_files_and_with_overwrite_touches_only_its_own(run, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "notes.txt").write_text("mine")
    (photos / "sub" / "a.png").write_bytes(b"\x89PNG not really")
    mine = _tree(photos)
    r = _run("training.export", run, photos)
    assert r.returncode != 0 and "already holds files" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr and _tree(photos) == mine
    r = _run("training.export", run, photos, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    after = _tree(photos)
    assert {k: after[k] for k in mine} == mine  # the user's files, byte for byte
    manifest = json.loads(after["manifest.json"])
    assert set(after) == set(mine) | set(manifest["files"]) | {"manifest.json"}
    # A later export replaces only what the earlier one listed: a file it no longer writes goes, the user's stay.
    manifest["files"]["stale.json"] = {"size": 2, "sha256": "0" * 64}
    (photos / "stale.json").write_text("{}")
    (photos / "manifest.json").write_text(json.dumps(manifest))
    r = _run("training.export", run, photos, "--overwrite")
    assert r.returncode == 0 and not (photos / "stale.json").exists() and (photos / "notes.txt").read_text() == "mine"
    r = _run("training.export", run, photos)
    assert r.returncode != 0 and "earlier output of this command" in r.stderr


@pytest.mark.parametrize("where", ["run", "inside", "cwd"])
def test_export_never_writes_into_the_run_it_reads(run, where):
    """Exporting a run into itself deleted its checkpoints; exporting to '.' emptied the working folder, then
    crashed and left .export-* behind."""
    target = {"run": run, "inside": run / "exported", "cwd": "."}[where]
    parent = run.parent
    before = _tree(parent)
    for extra in ((), ("--overwrite",)):
        r = _run("training.export", run, target, *extra, cwd=parent)
        assert r.returncode != 0 and "which it is made from" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert _tree(parent) == before and not [d for d in os.listdir(parent) if d.startswith(".export-")]


def test_an_exported_folder_is_checked_against_its_manifest(run, tmp_path):
    out = tmp_path / "model"
    assert _run("training.export", run, out).returncode == 0
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    ok = _run("mfsr_fast", tmp_path / "in.png", "-o", tmp_path / "up", "--model", out)
    assert ok.returncode == 0, ok.stderr[-2000:]
    weights = out / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the tensor data: same size, valid header
    weights.write_bytes(bytes(data))
    r = _run("mfsr_fast", tmp_path / "in.png", "-o", tmp_path / "up2", "--model", out)
    assert r.returncode == 2 and "SHA-256" in r.stderr and "Traceback" not in r.stderr
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    (out / "manifest.json").unlink()
    r = _run("mfsr_fast", tmp_path / "in.png", "-o", tmp_path / "up3", "--model", out)
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr


def test_restorer_conversion_never_deletes_a_folder(tmp_path):
    """``python -m mfsr_fast.models.ncnn convert`` replaced its output folder wholesale, as export did."""
    param, _ = write_ncnn(_net(), str(tmp_path / ncnn.MODEL_FILE))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"photo")
    r = _run("mfsr_fast.models.ncnn", "convert", param, out)
    assert r.returncode != 0 and "already holds files" in r.stderr and _tree(out) == {"holiday.jpg": b"photo"}
    r = _run("mfsr_fast.models.ncnn", "convert", param, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "holiday.jpg").read_bytes() == b"photo" and (out / "model.safetensors").is_file()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(param, src)
    shutil.copy(param[:-len(".param")] + ".bin", src)
    r = _run("mfsr_fast.models.ncnn", "convert", src, src, "--overwrite")
    assert r.returncode != 0 and "which it is made from" in r.stderr and len(os.listdir(src)) == 2


# Training folders: one run each, settings changed only when named, one history in the log.


def test_a_folder_holds_one_run(data, run, tmp_path):
    """A new run started without --resume in a used folder started over silently, and a later --resume mixed the
    two runs' checkpoints."""
    before = _tree(run)
    r = _teacher(data, run)
    assert r.returncode != 0 and "already holds a training run" in r.stderr and "--resume" in r.stderr
    assert _tree(run) == before
    r = _teacher(data, run, "--override", "lr")
    assert r.returncode != 0 and "use it with --resume" in r.stderr


def test_resume_refuses_changed_settings_unless_named_and_records_them(data, run, tmp_path):
    """--resume with a changed lr, batch size, crop, degradation or seed continued silently and overwrote the run's
    config.json."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    config = (out / "config.json").read_text()
    for flag, value in (("--lr", "1e-3"), ("--batch-size", "2"), ("--crop", "16"), ("--seed", "5"),
                        ("--degradation", "bicubic")):
        r = _teacher(data, out, "--resume", "--max-steps", "8", flag, value)
        assert r.returncode != 0 and f"--override {flag[2:].replace('-', '_')}" in r.stderr, r.stderr[-2000:]
        assert (out / "config.json").read_text() == config
    r = _teacher(data, out, "--resume", "--max-steps", "8", "--lr", "1e-3", "--override", "lr")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    (changed,) = [row for row in rows if row.get("kind") == "override"]
    assert changed["step"] == 6 and changed["changed"] == {"lr": [0.0003, 0.001]}
    assert json.load(open(out / "config.json"))["lr"] == 0.001
    r = _teacher(data, out, "--resume", "--max-steps", "10", "--lr", "1e-3")  # the run's settings are now these
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_resumed_log_is_one_history_and_export_counts_it_once(data, run, tmp_path):
    """After a resume, log.jsonl repeated rows (1, 2, 3, 4, 3, 4, 5, 6) and export's training time counted them
    twice."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")  # the run goes on from step 4: steps 5 and 6 are redone
    r = _teacher(data, out, "--resume")
    assert r.returncode == 0 and "(step 4)" in r.stdout, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert _run("training.export", out, tmp_path / "exp").returncode == 0
    info = json.load(open(tmp_path / "exp" / "info.json"))
    steps = [0] + [row["step"] for row in rows]
    want = sum((b - a) / row["steps_per_s"] for a, b, row in zip(steps, steps[1:], rows))
    assert info["student"]["steps"] == 6 and abs(info["student"]["train_seconds"] - round(want, 1)) < 0.11


def test_a_checkpoint_whose_manifest_was_deleted_is_passed_over(data, run, tmp_path):
    """A checkpoint whose manifest was deleted was accepted (its files unchecked) and blessed with a fresh one."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoints" / "step_00000006" / "manifest.json").unlink()
    r = _teacher(data, out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "manifest.json is missing" in r.stdout and "(step 4)" in r.stdout
