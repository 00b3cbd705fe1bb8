"""The wheel: ``python -m build --wheel`` holds the embedded default and the restorer it names; installed into a
fresh virtual environment (no checkout on the path, Hugging Face offline), ``mfsr-upscale`` upscales an image and
gives the checkout's output; ``--version`` prints the one version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import mfsr_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTORER = os.path.join(ROOT, "mfsr_fast", "weights", "realesrgan-x4plus", "model.safetensors")
SKIP = ("runs", "outputs", "build", "dist", ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
        ".benchmarks", ".ruff_cache")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert res.returncode == 0, f"{cmd[:3]}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.skipif(not os.path.isfile(RESTORER), reason="Real-ESRGAN x4plus not installed here (make setup fetches "
                    "it); a wheel without it could not upscale with the default")
def test_wheel_installs_into_a_fresh_venv_and_upscales_offline(tmp_path):
    pytest.importorskip("build", reason="python -m build is in the test extra (pip install -e '.[test]')")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))  # the source tree, not the build leftovers
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)])
    (wheel,) = os.listdir(tmp_path / "dist")
    assert wheel.startswith(f"mfsr_fast-{mfsr_fast.__version__}-") and wheel.endswith(".whl")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
        names = set(z.namelist())
    for f in ("weights/default/diffusion_pytorch_model.safetensors", "weights/default/config.json",
              "weights/default/info.json", "weights/realesrgan-x4plus/model.safetensors",
              "weights/default/sampler_config.json", "weights/realesrgan-x4plus/info.json", "apps/cli.py"):
        assert f"mfsr_fast/{f}" in names, f
    assert not any(n.startswith(("tests/", "runs/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # torch first, pinned to the running build (a bare requirement could pull a multi-GB CUDA build), then the wheel.
    _run([py, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}"], env=env)
    _run([py, "-m", "pip", "install", "--quiet", str(tmp_path / "dist" / wheel)], env=env)

    work = tmp_path / "work"  # outside the checkout: only the installed package can be imported
    work.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(img).save(work / "in.png")
    cli = str(venv / "bin" / "mfsr-upscale")
    res = _run([cli, "--version"], cwd=work, env=env)
    assert res.stdout.strip() == f"mfsr-upscale {mfsr_fast.__version__}"
    res = _run([py, "-c", "import mfsr_fast, sys; print(mfsr_fast.__file__)"], cwd=work, env=env)
    assert res.stdout.strip().startswith(str(venv))
    # Both in float32: this process's tests run as on a CPU without native bfloat16 (conftest), the installed
    # command would take the machine's own precision.
    _run([cli, "in.png", "-o", "out", "--device", "cpu", "--dtype", "float32"], cwd=work, env=env)
    out = np.asarray(Image.open(work / "out" / "in_x4.png"))
    assert out.shape == (96, 80, 3)
    ours = mfsr_fast.upscale(img, device="cpu", dtype="float32")
    diff = np.abs(out.astype(int) - ours.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05  # the same weights and code (thread counts may round apart)
