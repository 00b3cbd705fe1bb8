"""Peak memory of the CLI against the image size and the tile size (CPU), with the network stubbed out.

Each case runs ``mfsr-upscale`` on one generated PNG in a fresh process whose model call is replaced by a bicubic x4
(so the figure is the pipeline's own memory: reading, noise, tiles, blending, colour fix, the output array, encoding,
not the network's activations, which depend on the tile only). Reported: peak RSS minus the RSS before the image is
read, per input pixel, beside what the uint8 output alone takes (48 bytes per input pixel at x4, RGB). With
``--benchmark``: 1, 4 and 16 MP inputs at tile 64 and 4 MP at tiles 32 and 128; without it, 0.06 MP smoke sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    import torch.nn.functional as F
    from mfsr_fast.apps import cli
    from mfsr_fast.models.transformer import MFSRTransformer
    from mfsr_fast.pipeline.pipeline import MFSRPipeline
    from mfsr_fast.pipeline.upscale import cached_pipeline

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    def stub(self, lr, noise, steps, restored, detail):
        return F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)

    MFSRPipeline._sample_tile = stub  # what the tiles' rows generator calls
    torch.manual_seed(0)
    model = MFSRTransformer.from_preset("tiny", num_layers=1, num_heads=2, head_dim=16, dual_attention_layers=(0,))
    model.save_pretrained(sys.argv[3])
    cached_pipeline(sys.argv[3])
    base = rss()
    rc = cli.main([sys.argv[1], "-o", sys.argv[2], "--model", sys.argv[3], "--tile", sys.argv[4], "--ext", "png"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rc": rc, "base": base, "peak": peak}))
""")


def _case(tmp_path, side: int, tile: int) -> dict:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (max(2, side // 16), max(2, side // 16), 3), dtype=np.uint8))
    src = tmp_path / f"in_{side}.png"
    small.resize((side, side), Image.BILINEAR).save(src)
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / f"out_{side}_{tile}"),
                          str(tmp_path / "model"), str(tile)], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["rc"] == 0
    rec.update(side=side, tile=tile, pixels=side * side, grown=rec["peak"] - rec["base"])
    return rec


def test_peak_memory_follows_the_output_not_the_tile(tmp_path, full, env_info):
    cases = [(1024, 64), (2048, 64), (4096, 64), (2048, 32), (2048, 128)] if full else [(128, 32), (384, 32),
                                                                                    (384, 64)]
    rows = [_case(tmp_path, side, tile) for side, tile in cases]
    print(f"\npeak memory of mfsr-upscale, network stubbed ({env_info})")
    print("| input | tile | peak - before the image | per input pixel | the uint8 output alone |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['side']}x{r['side']} ({r['pixels'] / 1e6:.2f} MP) | {r['tile']} | {r['grown'] / 2**20:.0f} MiB "
              f"| {r['grown'] / r['pixels']:.0f} B | {48 * r['pixels'] / 2**20:.0f} MiB |")
    series = sorted((r for r in rows if r["tile"] == rows[0]["tile"]), key=lambda r: r["pixels"])
    lo, hi = series[0], series[-1]
    slope = (hi["grown"] - lo["grown"]) / (hi["pixels"] - lo["pixels"])
    print(f"growth from {lo['side']} to {hi['side']} px: {slope:.0f} bytes per input pixel")
    # Linear in the output: a few times the output's 48 bytes per input pixel (the output, the input as floats,
    # the encoder's copy, the compressed file), far below the ~740 bytes per input pixel of a full-size float
    # pipeline.
    assert slope < 250, slope
    # The tile size moves memory only by the row of tiles being blended (4 floats per output pixel of the row) and
    # its temporaries: bounded by four such rows at the largest tile.
    same = sorted((r for r in rows if r["side"] == rows[-1]["side"]), key=lambda r: r["tile"])
    row_bytes = 16 * same[-1]["tile"] * 4 * same[-1]["side"] * 4
    spread = same[-1]["grown"] - same[0]["grown"]
    print(f"tiles {same[0]['tile']} -> {same[-1]['tile']}: {spread / 2**20:+.0f} MiB (one row of tiles: "
          f"{row_bytes / 2**20:.0f} MiB)")
    assert spread < 4 * row_bytes, (spread, row_bytes)
