"""The automatic precision against float32, on the pictures users see: the default's output in the precision chosen
for this machine (``MFSRPipeline.precision``) against its float32 output, PSNR over 8-bit pixels, at 1 and 4 steps,
on every ``make demo`` photo and, where ``../shared/data`` has them, the first 30 DRealSR LR images. Goal: at least
``GOAL_DB`` on each (8-bit rounding alone is about 59 dB). On a machine whose choice is float32 it is exact."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from PIL import Image

from mfsr_fast.apps.demo import PHOTOS, photo
from mfsr_fast.pipeline.loading import DEFAULT_MODEL
from mfsr_fast.pipeline.pipeline import MFSRPipeline

GOAL_DB = 45.0
DREALSR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "drealsr_x4", "LR")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_automatic_precision_against_float32(full, env_info):
    auto = MFSRPipeline.from_pretrained("default")
    fp32 = MFSRPipeline.from_pretrained("default", dtype="float32")
    images = {}
    for name in PHOTOS if full else PHOTOS[:1]:
        hr = Image.fromarray(photo(name, 384 if full else 64))
        images[name] = np.asarray(hr.resize((hr.width // 4, hr.height // 4), Image.BOX))
    for path in sorted(glob.glob(os.path.join(DREALSR, "*.png")))[: 30 if full else 1]:
        images[os.path.basename(path)] = np.asarray(Image.open(path).convert("RGB"))
    rows = []
    for name, lr in images.items():
        for steps in (1, 4):
            rows.append((name, steps, _psnr(auto(lr, steps=steps), fp32(lr, steps=steps))))
    print(f"\n{auto.precision} against float32 ({env_info}): PSNR over 8-bit pixels, dB")
    for name, steps, db in rows:
        print(f"| {name} | {steps} | {db:.2f} |")
    worst = min(db for *_, db in rows)
    print(f"worst {worst:.2f} dB over {len(rows)} outputs (goal {GOAL_DB:g})")
    assert worst >= GOAL_DB, worst
