"""Teacher and distillation commands: CLI, logs, checkpoints, exact resume after SIGKILL, signals, non-finite steps,
and DDP over gloo equal to one process. Uses the ``micro`` presets (1-block model, 32 px crops) on generated images."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(5):
        small = rng.uniform(0, 255, (6, 7, 3))
        img = Image.fromarray(small.astype(np.uint8)).resize((48 + 4 * i, 40), Image.BICUBIC)
        img.save(d / f"im{i}.png")
    (d / "broken.png").write_bytes(b"not an image")
    return str(d)


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600, **kw)


def _weights(run_dir, sub="model"):
    with open(os.path.join(run_dir, "checkpoints", "latest.json")) as f:
        name = json.load(f)["path"]
    return load_file(os.path.join(run_dir, "checkpoints", name, sub, "diffusion_pytorch_model.safetensors"))


def _teacher(images, out, *extra):
    return _run(["training.teacher", "--preset", "micro", "--data", images, "--output-dir", str(out), "--threads",
                 "1", *extra])


@pytest.fixture(scope="module")
def teacher_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = _teacher(images, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(out), res


def test_teacher_writes_config_log_and_checkpoints(teacher_run):
    out, res = teacher_run
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["max_steps"] == 6 and cfg["crop"] == 32
    assert "teacher config" in res.stdout and "skipped 1 unreadable" in res.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    assert kept == ["step_00000004", "step_00000006"]  # keep_checkpoints = 2
    w0 = _weights(out)
    assert any(k.startswith("prompt_context") for k in w0)


def test_resume_after_sigkill_is_bit_exact(images, teacher_run, tmp_path):
    ref_dir, _ = teacher_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training.teacher", "--preset", "micro", "--data", images,
                             "--output-dir", str(out), "--threads", "1", "--max-steps", "6"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = json.load(open(latest))["step"]
    assert step < 6
    res = _teacher(images, out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"(step {step})" in res.stdout
    for sub in ("model", "ema"):
        a, b = _weights(ref_dir, sub), _weights(str(out), sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after resume"


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_resume_falls_back_to_the_newest_whole_checkpoint(images, teacher_run, tmp_path, damage):
    """latest.json names a deleted folder, or the newest checkpoint is cut short: --resume continues from the one
    before (named, with the reason) and ends bit-identical to the uninterrupted run."""
    import shutil

    ref_dir, _ = teacher_run
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    newest = out / "checkpoints" / "step_00000006"
    if damage == "deleted":
        shutil.rmtree(newest)
    else:
        w = newest / "ema" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:-64])
    res = _teacher(images, out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping" in res.stdout and "step_00000006" in res.stdout and "(step 4)" in res.stdout
    for sub in ("model", "ema"):
        a, b = _weights(ref_dir, sub), _weights(str(out), sub)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after the fallback resume"


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(images, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "training.teacher", "--preset", "micro", "--data", images,
                             "--output-dir", str(out), "--threads", "1", "--max-steps", "1000", "--ckpt-every",
                             "1000"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while (not log.exists() or log.stat().st_size == 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "SIGTERM" in err and "--resume" in err
    step = json.load(open(out / "checkpoints" / "latest.json"))["step"]
    assert 1 <= step < 1000


def test_nonfinite_steps_are_skipped_then_abort_with_checkpoint(images, tmp_path, monkeypatch):
    from mfsr_fast.models.transformer import MFSRTransformer
    from training import teacher
    from training.components import codec_for
    from training.loop import train

    cfg = teacher.TeacherConfig(**dict(teacher.PRESETS["micro"], data=images, output_dir=str(tmp_path / "nan"),
                                       max_steps=20, max_nonfinite=3, ckpt_every=100))
    model = MFSRTransformer.from_preset(cfg.model_preset, **cfg.model_overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = teacher.make_loss(cfg, codec_for(model))
    calls = []

    def loss_fn(field, m, batch, step, d):
        calls.append(step)
        loss = good(field, m, batch, step, d)
        return loss * float("nan") if step >= 2 else loss  # two good steps, then it blows up

    with pytest.raises(SystemExit):
        train(cfg, model, loss_fn, name="teacher")
    meta = json.load(open(tmp_path / "nan" / "checkpoints" / "latest.json"))
    assert meta["step"] == 5 and calls == [0, 1, 2, 3, 4]
    state = json.load(open(tmp_path / "nan" / "checkpoints" / "step_00000005" / "trainer_state.json"))
    assert state["extra"]["nonfinite_steps"] == 3
    saved = _weights(str(tmp_path / "nan"))
    after_two = {k: v for k, v in model.state_dict().items()}
    for k in saved:  # the checkpoint holds the weights of the last good step, not NaN
        assert torch.isfinite(saved[k]).all() and torch.equal(saved[k], after_two[k])
    assert any(not torch.equal(before[k], saved[k]) for k in saved)


def test_max_minutes_stops_with_a_checkpoint(images, tmp_path, capsys):
    from mfsr_fast.models.transformer import MFSRTransformer
    from training import teacher
    from training.components import codec_for
    from training.distributed import setup
    from training.loop import train

    cfg = teacher.TeacherConfig(**dict(teacher.PRESETS["micro"], data=images, output_dir=str(tmp_path / "timed"),
                                       max_steps=1000, ckpt_every=1000, max_minutes=1e-9))
    model = MFSRTransformer.from_preset(cfg.model_preset, **cfg.model_overrides)
    path = train(cfg, model, teacher.make_loss(cfg, codec_for(model)), name="teacher")
    meta = json.load(open(tmp_path / "timed" / "checkpoints" / "latest.json"))
    assert meta["step"] == 1 and path.endswith("step_00000001")  # the budget ran out during the first step
    assert "--max-minutes 1e-09 reached at step 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="max-minutes"):
        setup(dataclasses.replace(cfg, max_minutes=-1))


def test_degrading_on_the_device_gives_the_same_batches_and_weights(images, teacher_run, tmp_path):
    from training import teacher
    from training.batches import DEGRADATIONS, StepBatches, degrade_samples

    cfg = teacher.TeacherConfig(**dict(teacher.PRESETS["micro"], data=images, output_dir=str(tmp_path / "x")))
    with_workers = StepBatches(cfg, 0, 1)[3]
    hr, seeds = StepBatches(cfg, 0, 1, degrade=False)[3]
    gt, lr = degrade_samples(hr, seeds, DEGRADATIONS[cfg.degradation])
    for a, b in zip(with_workers, (gt, lr, seeds)):
        assert torch.equal(a, b)
    ref_dir, _ = teacher_run
    res = _teacher(images, tmp_path / "dev", "--degrade-on", "device")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(ref_dir), _weights(str(tmp_path / "dev"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    bad = _teacher(images, tmp_path / "bad", "--degrade-on", "gpu")
    assert bad.returncode != 0 and "--degrade-on must be" in bad.stderr


def test_distill_from_teacher_run(images, teacher_run, tmp_path):
    from training.components import resolve_teacher

    teacher_dir, _ = teacher_run
    out = tmp_path / "student"
    res = _run(["training.distill", "--preset", "micro", "--teacher", teacher_dir, "--data", images, "--output-dir",
                str(out), "--threads", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    student = _weights(str(out))
    teacher = resolve_teacher(teacher_dir)[0].state_dict()
    assert student.keys() == teacher.keys()  # same architecture, prompts carried
    assert any(not torch.equal(student[k], teacher[k]) for k in student)
    bad = _run(["training.distill", "--preset", "micro", "--data", images, "--output-dir", str(tmp_path / "x")])
    assert bad.returncode != 0 and "--teacher is required" in bad.stderr


def test_distill_grows_a_deeper_student_that_starts_as_the_teacher(images, teacher_run, tmp_path):
    """--grow-layers 2: the student has two more blocks than the teacher, and its first step's loss is the plain
    student's to the bit (it computes the same function until the first update)."""
    from training.components import resolve_teacher

    teacher_dir, _ = teacher_run
    base = ["training.distill", "--preset", "micro", "--teacher", teacher_dir, "--data", images, "--threads", "1"]
    args = base + ["--max-steps", "1", "--log-every", "1"]
    runs = {}
    for name, extra in (("plain", []), ("grown", ["--grow-layers", "2"])):
        res = _run(args + ["--output-dir", str(tmp_path / name)] + extra)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]
    assert runs["grown"][0]["loss"] == runs["plain"][0]["loss"]
    depth = resolve_teacher(teacher_dir)[0].cfg.num_layers
    cfg = json.load(open(next((tmp_path / "grown" / "checkpoints").glob("step_*")) / "ema" / "config.json"))
    assert cfg["num_layers"] == depth + 2
    bad = _run(args + ["--output-dir", str(tmp_path / "bad"), "--grow-layers", "-1"])
    assert bad.returncode != 0 and "--grow-layers must be >= 0" in bad.stderr
    # Resuming it as another model (without --grow-layers) is a one-line error, not a state-dict traceback.
    bad = _run(base + ["--max-steps", "2", "--output-dir", str(tmp_path / "grown"), "--resume"])
    assert bad.returncode != 0 and "--grow-layers 0 (the run: 2)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_distill_init_starts_from_an_existing_student(images, teacher_run, tmp_path):
    """--init: the student starts from another student's weights and sampling grid, not the teacher's. With lr 0 the
    run's weights stay the init student's to the bit; --refine-t still overrides its grid; a model of another
    architecture, or no model, is a one-line error."""
    from mfsr_fast.models.transformer import MFSRTransformer
    from training.components import resolve_teacher

    teacher_dir, _ = teacher_run
    base = ["training.distill", "--preset", "micro", "--teacher", teacher_dir, "--data", images, "--threads", "1",
            "--max-steps", "1", "--log-every", "1"]
    first = tmp_path / "first"
    res = _run(base + ["--output-dir", str(first), "--refine-t", "0.1"])
    assert res.returncode == 0, res.stderr[-3000:]
    for name, extra, refine in (("again", [], 0.1), ("regrid", ["--refine-t", "0.2"], 0.2)):
        res = _run(base + ["--output-dir", str(tmp_path / name), "--init", str(first), "--lr", "0"] + extra)
        assert res.returncode == 0, res.stderr[-3000:]
        cfg = json.load(open(next((tmp_path / name / "checkpoints").glob("step_*")) / "model" /
                             "sampler_config.json"))
        assert cfg["refine_t"] == refine
    start, again = _weights(str(first), "ema"), _weights(str(tmp_path / "again"))
    teacher = resolve_teacher(teacher_dir)[0].state_dict()
    assert start.keys() == again.keys()
    assert all(torch.equal(again[k], start[k].to(again[k].dtype)) for k in again)
    assert any(not torch.equal(again[k], teacher[k].to(again[k].dtype)) for k in again)
    meta = json.load(open(next((tmp_path / "again" / "checkpoints").glob("step_*")) / "trainer_state.json"))
    assert meta["extra"]["init"] == str(first) and len(meta["extra"]["init_weights"]) == 64
    other = MFSRTransformer.from_preset("tiny")  # the micro teacher has 1 block
    other.save_pretrained(tmp_path / "other")
    for path, msg in ((tmp_path / "other", "not the teacher's architecture and flow (num_layers"),
                      (tmp_path / "nothing", "--init: model")):
        bad = _run(base + ["--output-dir", str(tmp_path / "bad"), "--init", str(path)])
        assert bad.returncode != 0 and msg in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr


def test_cli_overrides_and_bad_values(images, tmp_path):
    from training.config import parse_config
    from training.distill import PRESETS, DistillConfig

    cfg = parse_config(DistillConfig, PRESETS, ["--preset", "micro", "--batch-size", "8", "--no-amp",
                                                       "--model-overrides", '{"num_layers": 2}'], "x")
    assert cfg.batch_size == 8 and cfg.amp is False and cfg.model_overrides == {"num_layers": 2} and cfg.crop == 32
    with pytest.raises(SystemExit):
        parse_config(DistillConfig, PRESETS, ["--batch-size", "eight"], "x")


def test_ddp_two_gloo_ranks_equal_one_process(images, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks end with the same weights as one process on the global batch."""
    single, double = tmp_path / "one", tmp_path / "two"
    res = _teacher(images, single, "--max-steps", "3", "--ema-decay", "0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(["torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "training.teacher",
                "--preset", "micro", "--data", images, "--output-dir", str(double), "--threads", "1",
                "--max-steps", "3", "--ema-decay", "0.5"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(str(single)), _weights(str(double))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_distill_dit4sr_teacher_with_vae_and_prompt_file(images, tmp_path):
    """The real recipe's path at toy size: a DiT4SR-format teacher folder, the SD3-style VAE, prompt embeddings from
    a file; the student keeps the prompts frozen, exports with its VAE and upscales from that one folder."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_dit4sr_checkpoints import dit4sr_kit

    from mfsr_fast import upscale
    from mfsr_fast.models.prompts import load_prompts

    teacher_dir, vae, prompt_file = dit4sr_kit(tmp_path)
    out = tmp_path / "student"
    base = ["training.distill", "--preset", "micro", "--teacher", str(teacher_dir), "--data", images, "--threads", "1",
            "--max-steps", "2", "--guidance", "8.0"]
    res = _run([*base, "--vae", vae, "--prompts", prompt_file, "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dit4sr checkpoint" in res.stdout and "dit4sr_norm_k_bug=True" in res.stdout
    w = _weights(str(out))
    prompts = load_prompts(prompt_file)
    torch.testing.assert_close(w["prompt_context"][1], prompts["negative"][0])  # frozen: unchanged by training
    assert torch.count_nonzero(w["prompt_context"][2]) == 0  # null: zeros
    assert any(w[k].abs().sum() > 0 for k in w if k.startswith("h_embed.linear_2"))  # the h embedder learned
    res = _run(["training.export", str(out), str(tmp_path / "export")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "export" / "vae" / "config.json").exists()
    img = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    assert upscale(img, model=str(tmp_path / "export")).shape == (48, 64, 3)
    # Missing pieces are clear errors.
    res = _run([*base, "--vae", vae, "--output-dir", str(tmp_path / "x")])
    assert res.returncode != 0 and "stores no prompts: pass --prompts" in res.stderr
    res = _run([*base, "--prompts", prompt_file, "--output-dir", str(tmp_path / "y")])
    assert res.returncode != 0 and "pass --vae" in res.stderr


def test_ddp_distill_two_gloo_ranks_equal_one_process(images, teacher_run, tmp_path):
    """Distillation under DDP (2 CPU processes over gloo) with the default explicit tangent pass, which goes through
    the DDP wrapper: both ranks end with the weights of one process on the global batch."""
    teacher_dir, _ = teacher_run
    args = ["--preset", "micro", "--teacher", teacher_dir, "--data", images, "--threads", "1", "--max-steps", "3"]
    single, double = tmp_path / "one", tmp_path / "two"
    res = _run(["training.distill", *args, "--output-dir", str(single)])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(["torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "training.distill", *args,
                "--output-dir", str(double)])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(str(single)), _weights(str(double))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp2_two_gloo_ranks_equal_one_process_and_resume(images, teacher_run, tmp_path):
    """Distillation with --fsdp (FSDP2, 2 CPU processes over gloo; the explicit tangent pass and the gradient pass
    through the sharded model) ends with the weights and EMA of one process on the global batch; a sharded run resumes
    from its own checkpoint (optimizer state re-sharded) to the same weights as an uninterrupted single process."""
    teacher_dir, _ = teacher_run
    args = ["--preset", "micro", "--teacher", teacher_dir, "--data", images, "--threads", "1", "--ema-decay", "0.5"]
    single, double = tmp_path / "one", tmp_path / "two"
    res = _run(["training.distill", *args, "--output-dir", str(single), "--max-steps", "4"])
    assert res.returncode == 0, res.stderr[-3000:]
    torchrun = ["torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "training.distill", *args,
                "--fsdp", "--output-dir", str(double)]
    res = _run([*torchrun, "--max-steps", "3"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([*torchrun, "--max-steps", "4", "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step 3" in res.stdout
    for sub in ("model", "ema"):
        a, b = _weights(str(single), sub), _weights(str(double), sub)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{sub}: {k}")
    with open(os.path.join(double, "checkpoints", "latest.json")) as f:
        name = json.load(f)["path"]
    cfg = json.load(open(os.path.join(double, "checkpoints", name, "model", "config.json")))
    assert cfg["_class_name"] == "MFSRTransformer"


def test_diagnose_teacher_table(teacher_run, tmp_path):
    from training import diagnose

    teacher_dir, _ = teacher_run
    rng = np.random.default_rng(5)
    for sub in ("HR", "LR"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    for i in range(3):
        hr = Image.fromarray(rng.uniform(0, 255, (20, 24, 3)).astype(np.uint8)).resize((96, 80), Image.NEAREST)
        hr.save(tmp_path / "pairs" / "HR" / f"p{i}.png")
        hr.resize((24, 20), Image.BICUBIC).save(tmp_path / "pairs" / "LR" / f"p{i}.png")
    out = tmp_path / "diag.json"
    assert diagnose.main(["--teacher", teacher_dir, "--data", str(tmp_path / "pairs"), "--crop", "16", "--t-values",
                          "1,0.5,0.001", "--steps", "1,3", "--json", str(out), "--device", "cpu"]) == 0
    res = json.load(open(out))
    assert res["pairs"] == 3
    assert res["euler"]["1"] == pytest.approx(res["x_hat"]["1.0"], abs=1e-6)  # one Euler step is the t = 1 estimate
    assert res["x_hat"]["0.001"] > 35 > res["x_hat"]["1.0"]  # z_0.001 is almost the HR image itself
    # The teacher's sampler as evaluate names it: the first step (t = 1) guided, so one step is no longer x_hat(1).
    assert diagnose.main(["--teacher", teacher_dir, "--data", str(tmp_path / "pairs"), "--crop", "16", "--t-values",
                          "1", "--steps", "1,3", "--sampling", "cfg3:refine0.5:above0.5", "--json", str(out),
                          "--device", "cpu"]) == 0
    guided = json.load(open(out))
    assert guided["sampling"] == {"guidance": 3.0, "against": "negative", "refine_t": 0.5, "interval": [0.5, 1.0],
                                  "flat_detail": 1.0}
    assert guided["x_hat"]["1.0"] == pytest.approx(res["x_hat"]["1.0"], abs=1e-9)
    assert abs(guided["euler"]["1"] - guided["x_hat"]["1.0"]) > 1e-5  # a barely trained teacher: prompts close
    for bad in (["--t-values", "0"], ["--steps", "x"], ["--crop", "200"], ["--sampling", "cfg"],
                ["--sampling", "refine1.5"], ["--sampling", "flat0.25"]):  # flow space: no decoded output to compose
        with pytest.raises(SystemExit):
            diagnose.main(["--teacher", teacher_dir, "--data", str(tmp_path / "pairs"), *bad])


def test_export_summary_counts_the_exported_checkpoint_steps(tmp_path):
    """info.json's step count is the exported checkpoint's: a run stopped by --max-minutes between two log lines
    (the log ends at 200, the checkpoint is step 241) and an earlier checkpoint of a run that went on."""
    from training.export import _log_summary

    rows = [{"step": s, "loss": 1.0 / s, "steps_per_s": 2.0} for s in (50, 100, 150, 200)]
    rows.insert(2, {"kind": "val", "step": 100, "psnr": 20.0})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = _log_summary(str(tmp_path))
    assert whole == {"steps": 200, "train_seconds": 100.0, "final_loss": 1.0 / 200}
    stopped = _log_summary(str(tmp_path), upto=241)
    assert stopped["steps"] == 241 and stopped["logged_to"] == 200 and stopped["train_seconds"] == 100.0
    earlier = _log_summary(str(tmp_path), upto=100)
    assert earlier == {"steps": 100, "train_seconds": 50.0, "final_loss": 1.0 / 100}
    assert _log_summary(str(tmp_path), upto=10) == {"steps": 10}
