"""Timing helpers shared by the benchmark files."""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, reps: int) -> float:
    """Median wall time of fn over reps runs after one warm-up, synchronising CUDA around each run."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
