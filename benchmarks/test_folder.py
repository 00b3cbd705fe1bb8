"""Throughput on a folder: ``mfsr-upscale`` on a folder of photo-like PNGs with the embedded default (its real
networks, the precision chosen for the machine, 1 step), against Real-ESRGAN x4plus alone in float32 (channels_last)
reading and writing the same files, in the same process.

Reported: the first call (loading the model, then a 32 px image), images per second after it, and how busy the cores
were (the process's CPU time over the wall time and the cores it may use). With ``--benchmark``: eight 128 x 128 and
two 192 x 128 images; without it, two small images check the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_memory import _photo

from mfsr_fast.pipeline.loading import DEFAULT_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import glob, json, os, sys, time
    import numpy as np, torch
    from PIL import Image
    from mfsr_fast.apps import cli
    from mfsr_fast.models.restorer import load_restorer
    src, out, warm = sys.argv[1:4]

    def timed(fn):
        t, c = time.perf_counter(), os.times()
        res = fn()
        t1, c1 = time.perf_counter(), os.times()
        return res, t1 - t, (c1.user - c.user) + (c1.system - c.system)

    rc_warm, load, _ = timed(lambda: cli.main([warm, "-o", out + "_warm", "--ext", "png"]))
    rc, seconds, cpu = timed(lambda: cli.main([src, "-o", out, "--ext", "png"]))
    files = sorted(glob.glob(os.path.join(src, "*.png")))
    realesrgan = load_restorer(dtype=torch.float32)
    os.makedirs(out + "_realesrgan")

    def peer():
        for f in files:
            x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            y = realesrgan(x)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
            Image.fromarray(y).save(os.path.join(out + "_realesrgan", os.path.basename(f)))

    realesrgan(torch.rand(1, 3, 32, 32))  # warm-up
    _, peer_seconds, peer_cpu = timed(peer)
    print(json.dumps(dict(rc=rc, rc_warm=rc_warm, load=load, seconds=seconds, cpu=cpu, peer_seconds=peer_seconds,
                          peer_cpu=peer_cpu, images=len(files), cores=len(os.sched_getaffinity(0)))))
""")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_folder_throughput(tmp_path, full, env_info):
    sizes = [(128, 128)] * 8 + [(192, 128)] * 2 if full else [(24, 24), (32, 24)]
    src = tmp_path / "photos"
    src.mkdir()
    for i, (w, h) in enumerate(sizes):
        _photo(src / f"{i:02d}.png", w, h, seed=i)
    warm = _photo(tmp_path / "warm.png", 32, 32, seed=99)
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out"), warm], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["rc"] == 0 and rec["rc_warm"] == 0 and rec["images"] == len(sizes)
    assert len(os.listdir(tmp_path / "out")) == len(sizes)
    busy = rec["cpu"] / rec["seconds"] / rec["cores"]
    peer_busy = rec["peer_cpu"] / rec["peer_seconds"] / rec["cores"]
    print(f"\nfolder of {len(sizes)} images ({env_info}): loading {rec['load']:.1f} s; mfsr-upscale "
          f"{rec['images'] / rec['seconds']:.2f} images/s, cores {100 * busy:.0f} % busy; Real-ESRGAN x4plus fp32 "
          f"{rec['images'] / rec['peer_seconds']:.2f} images/s, cores {100 * peer_busy:.0f} % busy")
