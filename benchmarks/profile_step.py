"""Where a training step's time goes on a GPU: ``python benchmarks/profile_step.py [--batch B]``.

Profiles (torch.profiler, CPU + CUDA) the flow-matching step and the MeanFlow step with the explicit tangent pass of
``benchmarks/test_train_step.py`` (the 4-block ``dit4sr`` slice, bf16, 512 px shape, Triton path) and prints, per
step, the wall time, the summed GPU kernel time, and the kernels that take the most GPU time. GPU only.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_train_step import _setup, _step  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles GPU steps: no CUDA device here")
    from torch.profiler import ProfilerActivity, profile

    m, fn, z, t, r, v = _setup(True, args.batch)
    m.set_kernel_backend("triton")
    for kind in ("fm", "mf_explicit"):
        step = _step(m, fn, z, t, r, v, kind)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 3
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 3 / 1e3
        n_kernels = sum(e.count for e in events if e.self_device_time_total > 0) / 3
        print(f"== {kind}, batch {args.batch}: wall {wall * 1e3:.1f} ms per step, GPU kernels {gpu:.1f} ms "
              f"({n_kernels:.0f} launches)")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
