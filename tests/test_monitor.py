"""Watching a run (training/monitor.py, training/plot.py): sample grids and validation rows every --sample-every
steps and at the end, TensorBoard scalars and images, curves; training itself unchanged by it; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_restorer_model import _teacher_args, _tiny_images

pytest.importorskip("diffusers")


def _pairs(root, n=2, lr_px=48):
    """An HR/ + LR/ folder: HR lr_px * 4 px (NIQE needs 192), LR its 4x bicubic shrink."""
    rng = np.random.default_rng(3)
    os.makedirs(root / "HR")
    os.makedirs(root / "LR")
    for i in range(n):
        base = rng.integers(0, 256, (lr_px // 4, lr_px // 4, 3), dtype=np.uint8)
        hr = Image.fromarray(base).resize((4 * lr_px, 4 * lr_px), Image.BICUBIC)
        hr.save(root / "HR" / f"p{i}.png")
        hr.resize((lr_px, lr_px), Image.BICUBIC).save(root / "LR" / f"p{i}.png")
    return str(root)


def _niqe_params(path):
    """NIQE parameters of the right shapes (not the pristine ones: the plumbing is tested, not the values)."""
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    win = np.outer(g, g)
    np.savez(path, mu_pris_param=np.zeros((1, 36)), cov_pris_param=np.eye(36), gaussian_window=win / win.sum())
    return str(path)


def _rows(run):
    rows = [json.loads(x) for x in open(os.path.join(run, "log.jsonl"))]
    return [r for r in rows if r.get("kind") != "val"], [r for r in rows if r.get("kind") == "val"]


def _micro(out, data, *extra):
    return ["--preset", "micro", "--data", data, "--crop", "32", "--max-steps", "4", "--batch-size", "2",
            "--output-dir", str(out), "--num-workers", "0", "--ckpt-every", "4", *extra]


def test_teacher_and_student_runs_show_samples_metrics_tensorboard_and_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training import distill, export, teacher
    from training.plot import main as plot_main

    data = _tiny_images(tmp_path / "imgs")
    val = _pairs(tmp_path / "val")
    niqe = _niqe_params(tmp_path / "niqe.npz")
    watch = ["--sample-every", "3", "--sample-count", "2", "--val-data", val, "--val-count", "2", "--niqe-params",
             niqe, "--tensorboard"]
    assert teacher.main(_micro(tmp_path / "plain", data)) == 0
    assert teacher.main(_micro(tmp_path / "t", data, *watch)) == 0
    # Training is the same with the monitor on: same losses, same weights (it draws nothing from the run's RNG).
    plain_rows, _ = _rows(tmp_path / "plain")
    rows, val_rows = _rows(tmp_path / "t")
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain_rows]
    assert not os.path.exists(tmp_path / "plain" / "samples")  # off by default: nothing written
    from safetensors.torch import load_file

    def weights(run):
        return load_file(os.path.join(run, "checkpoints", "step_00000004", "model",
                                      "diffusion_pytorch_model.safetensors"))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "t")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Samples at step 3 and at the end (4): LR | bicubic | 1 step | HR, one row per held-in crop.
    assert sorted(os.listdir(tmp_path / "t" / "samples")) == ["step_0000003.png", "step_0000004.png"]
    grid = Image.open(tmp_path / "t" / "samples" / "step_0000004.png")
    assert grid.size == (4 * 32, 14 + 2 * 32)
    arr = np.asarray(grid)
    assert arr[14:, 96:].std() > 5  # the HR column holds an image
    assert [r["step"] for r in val_rows] == [3, 4]
    assert set(val_rows[0]) == {"step", "kind", "psnr_y@1", "ssim_y@1", "niqe@1", "seconds"}
    assert all(np.isfinite(v) for r in val_rows for k, v in r.items() if "@" in k)
    assert 5 < val_rows[-1]["psnr_y@1"] < 60
    ev = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    ev.Reload()
    assert {"val/psnr_y@1", "val/niqe@1", "train/loss"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("val/ssim_y@1")] == [3, 4]
    assert ev.Tags()["images"] == ["samples"]
    assert os.path.isfile(tmp_path / "t" / "curves.png")  # drawn at the end
    # A student shows 1 and 4 steps; export's summary ignores the validation rows.
    args = ["--preset", "micro", "--teacher", str(tmp_path / "t"), "--data", data, "--crop", "32", "--max-steps", "2",
            "--batch-size", "2", "--output-dir", str(tmp_path / "s"), "--num-workers", "0", "--sample-every", "2",
            "--sample-count", "1", "--refine-t", "0.05", "--refine-side", "above", "--jump", "endpoint"]
    with pytest.raises(SystemExit, match="--refine-t must be in"):
        distill.main([*args[:-5], "1.5", *args[-4:]])
    with pytest.raises(SystemExit, match="--refine-side must be one of below, above"):
        distill.main([*args[:-3], "sideways", *args[-2:]])
    with pytest.raises(SystemExit, match="--jump must be one of"):
        distill.main([*args[:-1], "midpoint"])
    assert distill.main(args) == 0
    train_rows, val_rows = _rows(tmp_path / "s")
    # The raw squared error beside MeanFlow's adaptive loss (which sits near 1 per sample whatever the error is).
    assert all(np.isfinite(r["mse"]) and r["mse"] > 0 and r["mse"] != r["loss"] for r in train_rows)
    # on the crops (no --val-data)
    assert set(val_rows[0]) == {"step", "kind", "psnr_y@1", "ssim_y@1", "psnr_y@4", "ssim_y@4", "seconds"}
    assert Image.open(tmp_path / "s" / "samples" / "step_0000002.png").size == (5 * 32, 14 + 32)
    assert export.main([str(tmp_path / "s"), str(tmp_path / "exp")]) == 0
    info = json.load(open(tmp_path / "exp" / "info.json"))["student"]
    assert info["steps"] == 2 and info["final_mse"] == train_rows[-1]["mse"]
    # The student's sampler (--refine-t, --jump, --refine-side) is in its checkpoints and exports from the start:
    # its samples used it.
    for folder in (tmp_path / "exp", tmp_path / "s" / "checkpoints" / "step_00000002" / "ema"):
        stored = json.load(open(folder / "sampler_config.json"))
        assert (stored["refine_t"], stored["jump"], stored["refine_side"]) == (0.05, "endpoint", "above")
        assert "refine_t" not in json.load(open(folder / "config.json"))
    # On demand, and a sentence for a folder that is not a run.
    os.remove(tmp_path / "s" / "curves.png")
    assert plot_main([str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "curves.png").size[0] > 400
    assert plot_main([str(tmp_path / "imgs")]) == 2


def test_bad_monitor_options_are_sentences_before_training(tmp_path):
    from training import teacher

    data = _tiny_images(tmp_path / "imgs")
    with pytest.raises(SystemExit, match="--val-data: .*expected HR/ and LR/"):
        teacher.main(_micro(tmp_path / "a", data, "--sample-every", "2", "--val-data", str(tmp_path)))
    with pytest.raises(SystemExit, match="--niqe-params: .*not found"):
        teacher.main(_micro(tmp_path / "b", data, "--sample-every", "2", "--niqe-params", str(tmp_path / "no.npz")))
    assert not os.path.exists(tmp_path / "a" / "checkpoints") and not os.path.exists(tmp_path / "b" / "checkpoints")


def test_restorer_conditioned_run_from_a_pool_samples_with_r(restorer_dir, tmp_path):  # noqa: F811
    from training import teacher
    from training.pool import build

    data = _tiny_images(tmp_path / "imgs")
    build(str(tmp_path / "pool"), data=data, count=4, crop=32, degradation="dit4sr", seed=0, shard=4)
    val = _pairs(tmp_path / "val", n=1, lr_px=16)
    assert teacher.main(_teacher_args(tmp_path / "tp", data, pool=tmp_path / "pool", sample_every=2,
                                      sample_count=3, val_data=val)) == 0
    grid = np.asarray(Image.open(tmp_path / "tp" / "samples" / "step_0000002.png"))
    assert grid.shape == (14 + 3 * 32, 4 * 32, 3)
    # A fresh residual model returns R(LR): the 1-step column is the pool's R(LR), not the bicubic column.
    from training.shards import Pool

    r = Pool(str(tmp_path / "pool"))[0][2]
    col = grid[14:46, 64:96].astype(float)
    r = r.permute(1, 2, 0).numpy() * 255
    assert np.abs(col - r).mean() < 1 < 10 < np.abs(grid[14:46, 32:64] - r).mean()  # bicubic is far from it
    _, val_rows = _rows(tmp_path / "tp")
    assert val_rows and set(val_rows[0]) == {"step", "kind", "psnr_y@1", "ssim_y@1", "seconds"}  # 64 px: no NIQE
