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


def peak_mb(fn) -> float:
    """Peak CUDA memory (MiB) that one call of fn allocates above what was allocated before; NaN without CUDA."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
