"""The device scripts (benchmarks/*.sh) run on a lent GPU, minutes at a time: a syntax error there costs a call.
``bash -n`` parses each one here."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))


def test_the_device_scripts_are_found():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"gpu_check.sh", "gpu_restorer.sh", "gpu_restorer_prep.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_device_script_parses(path):
    done = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_pipeline_times_each_part_of_a_step(tmp_path, capsys):
    """benchmarks/gpu_pipeline.py (stage 0 of gpu_restorer.sh) on the CPU with a micro model: every part timed, the
    ceilings printed; a bad preset is one sentence."""
    import numpy as np
    from PIL import Image

    from benchmarks.gpu_pipeline import main

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    assert main(["--data", str(tmp_path), "--preset", "micro", "--batch", "2", "--reps", "1", "--workers", "4",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = dict(line.strip("| ").split(" | ") for line in table)
    rows.pop("part")
    assert set(rows) == {"batch on the CPU, degraded (one worker)", "batch on the CPU, not degraded",
                         "degradation on the device", "optimizer step on a ready batch"}  # micro: no restorer
    assert all(float(s) > 0 for s in rows.values())
    assert "ceiling, --degrade-on workers (4 processes)" in out and "ceiling, --degrade-on device" in out
    with pytest.raises(SystemExit, match="--preset must be one of"):
        main(["--data", str(tmp_path), "--preset", "huge"])
    with pytest.raises(SystemExit, match="gpu_pipeline: "):
        main(["--data", str(tmp_path / "none"), "--preset", "micro", "--device", "cpu"])


def test_make_train_default_exports_the_sampling_the_embedded_default_stores():
    """`make train-default`'s export sets the multi-step sampler and flat_detail the shipped default was measured with:
    the recipe reproduces the folder's sampler_config.json, not an older sampler."""
    import json
    import shlex

    from training import export

    make = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    line = next(x for x in make.splitlines() if "training.export" in x and "weights/default" in x)
    args = export.build_parser().parse_args(shlex.split(line.split("-m training.export", 1)[1]))
    cfg = json.load(open(os.path.join(ROOT, "mfsr_fast", "weights", "default", "sampler_config.json")))
    assert args.output == "mfsr_fast/weights/default" and args.no_restorer
    for key in ("refine_t", "refine_side", "jump", "flat_detail"):
        assert getattr(args, key) is not None, f"the recipe leaves {key} at the run's"
        assert getattr(args, key) == cfg[key], (key, getattr(args, key), cfg[key])
