"""Peak memory of ``mfsr-upscale`` with the embedded default, its real networks (the transformer and Real-ESRGAN
x4plus), at several image sizes and widths (CPU).

Each case runs the command line on one generated photo-like PNG in a fresh process: reported is the peak RSS of
the whole process (the model, the restorer, Python, torch) and the growth above the same process's peak after an
upscale of a 32 x 32 image (what the networks and libraries take before any large image); beside it, where the C
library is glibc, the peak of what its heap had handed out and not had back (sampled every millisecond): the live
data apart from the free memory the heap keeps, which makes the peak RSS vary from run to run. With ``--benchmark``:
128 x 128, 256 x 256, 640 x 480, 2048 x 256 and 1024 x 768, and the goals checked: a 640 x 480 input within
``GOAL_VGA_MB`` of a 128 x 128 one, a 2048 x 256 strip within ``GOAL_WIDTH_MB`` of a 256 x 256 square (the output
array excepted, which is the user's result). Without it, 64 x 64 and 96 x 64 check the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from mfsr_fast.pipeline.loading import DEFAULT_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_VGA_MB = 100
GOAL_WIDTH_MB = 100

CHILD = textwrap.dedent("""
    import ctypes, json, resource, sys, threading, time
    from mfsr_fast.apps import cli

    class Mallinfo2(ctypes.Structure):  # glibc's heap statistics
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = Mallinfo2
    except AttributeError:
        mallinfo2 = None
    heap = [0, True]  # peak bytes in use, running

    def sample():  # every millisecond: bytes the heap has handed out and not had back (mmapped chunks included)
        while heap[1]:
            m = mallinfo2()
            heap[0] = max(heap[0], m.uordblks + m.hblkhd)
            time.sleep(0.001)

    if mallinfo2 is not None:
        threading.Thread(target=sample, daemon=True).start()
    warm = cli.main([sys.argv[1], "-o", sys.argv[2] + "_warm", "--ext", "png"] + sys.argv[4:])
    base, heap_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, heap[0]
    t0 = time.perf_counter()
    rc = cli.main([sys.argv[3], "-o", sys.argv[2], "--ext", "png"] + sys.argv[4:])
    seconds = time.perf_counter() - t0
    peak, heap[1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    print(json.dumps({"rc": rc, "warm_rc": warm, "base": base, "peak": peak, "seconds": seconds,
                      "heap_base": heap_base if mallinfo2 else None, "heap": heap[0] if mallinfo2 else None}))
""")


def _photo(path, w: int, h: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8))
    small.resize((w, h), Image.BICUBIC).save(path)
    return str(path)


def _case(tmp_path, w: int, h: int, *extra: str) -> dict:
    warm = _photo(tmp_path / "warm.png", 32, 32, seed=1)
    src = _photo(tmp_path / f"in_{w}x{h}.png", w, h)
    res = subprocess.run([sys.executable, "-c", CHILD, warm, str(tmp_path / f"out_{w}x{h}"), src, *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["rc"] == 0 and rec["warm_rc"] == 0
    rec.update(w=w, h=h, grown=rec["peak"] - rec["base"], output=48 * w * h)
    return rec


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_peak_memory_with_the_real_networks(tmp_path, full, env_info):
    sizes = [(128, 128), (256, 256), (640, 480), (2048, 256), (1024, 768)] if full else [(64, 64), (96, 64)]
    rows = {(w, h): _case(tmp_path, w, h) for w, h in sizes}
    print(f"\npeak RSS of mfsr-upscale with the embedded default, 1 step, automatic precision ({env_info})")
    print("| input | seconds | peak RSS | above a 32 x 32 run | peak heap in use | the uint8 output alone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (w, h), r in rows.items():
        heap = f"{r['heap'] / 2**20:.0f} MiB" if r["heap"] else "(not glibc)"
        print(f"| {w} x {h} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} MiB | {r['grown'] / 2**20:.0f} MiB "
              f"| {heap} | {r['output'] / 2**20:.1f} MiB |")
    if full:
        for key, what in (("peak", "peak RSS"), ("heap", "peak heap in use")):
            if rows[(128, 128)][key] is None:
                continue
            vga = (rows[(640, 480)][key] - rows[(128, 128)][key]) / 2**20
            wide = (rows[(2048, 256)][key] - rows[(256, 256)][key]
                    - (rows[(2048, 256)]["output"] - rows[(256, 256)]["output"])) / 2**20
            print(f"{what}: 640 x 480 over 128 x 128 {vga:+.0f} MiB (goal {GOAL_VGA_MB}); 2048 x 256 over 256 x 256, "
                  f"outputs aside, {wide:+.0f} MiB (goal {GOAL_WIDTH_MB})")
