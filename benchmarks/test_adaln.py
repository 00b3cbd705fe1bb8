"""adaLN kernel benchmarks: forward, forward+JVP, forward+backward (gated residual + LN + modulation).

On a GPU, at DiT4SR shapes (B = 2, L = 2202 and 8346, D = 1536, bf16; ``--benchmark``): the Triton kernel against the
eager reference, ``torch.compile`` of the reference and (for the JVP) ``torch.func.jvp`` of the reference, all timed in
the same test. ``extra_info`` records GB/s (bytes the op must move at minimum: see ``_bytes``) and ratios. A speedup is
reported only after the outputs pass a parity check. Without a GPU: small sizes of the reference only (the Triton
interpreter is no performance figure), and ``extra_info`` says so.
"""

from __future__ import annotations

import pytest
import torch
from timing import median_seconds

import kernels

CUDA = torch.cuda.is_available()


def _bytes(mode: str, B: int, L: int, D: int, elt: int) -> int:
    """Minimal traffic of the gated op (modulation vectors are negligible): fwd reads x, h and writes x', y; a fused
    fwd+JVP also reads tx, th and writes tx', ty; the backward reads dy, dx', x', h again and writes dx, dh."""
    n = B * L * D * elt
    return {"fwd": 4 * n, "fwd+jvp": 8 * n, "fwd+bwd": 10 * n}[mode]


def _make(B, L, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x, h, tx, th, dy, dxr = (torch.randn(B, L, D, device=device, dtype=dtype, generator=g) for _ in range(6))
    shift, scale, gate, ts, tc, tg = (torch.randn(B, D, device=device, dtype=dtype, generator=g) * 0.1
                                      for _ in range(6))
    return x, h, tx, th, dy, dxr, shift, scale, gate, ts, tc, tg


def _ops(backend, compiled=False):
    def fwd(x, h, shift, scale, gate):
        return kernels.adaln_modulate(x, shift, scale, gate=gate, h=h, backend=backend)

    f = torch.compile(fwd) if compiled else fwd
    return f


SHAPES = [(2, 2202, 1536), (2, 8346, 1536)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+jvp", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=["L2202", "L8346"])
def test_adaln(benchmark, full, env_info, mode, shape):
    dtype = torch.bfloat16
    device = "cuda" if CUDA else "cpu"
    B, L, D = shape if (CUDA and full) else (2, 256, 1536) if CUDA else (2, 64, 256)
    x, h, tx, th, dy, dxr, shift, scale, gate, ts, tc, tg = _make(B, L, D, dtype, device)
    impls = {"reference": _ops("reference")}
    if CUDA:
        impls = {"triton": _ops("triton"), "reference": _ops("reference"),
                 "reference_compiled": _ops("reference", compiled=True)}

    def runner(op):
        if mode == "fwd":
            return lambda: op(x, h, shift, scale, gate)
        if mode == "fwd+jvp":
            return lambda: torch.func.jvp(lambda a, b, c, d, e: op(a, b, c, d, e), (x, h, shift, scale, gate),
                                          (tx, th, ts, tc, tg))
        xs, hs, ss, cs, gs = (t.detach().requires_grad_(True) for t in (x, h, shift, scale, gate))

        def step():
            xo, y = op(xs, hs, ss, cs, gs)
            torch.autograd.backward((xo, y), (dxr, dy))
        return step

    info = dict(env_info, mode=mode, shape=[B, L, D], dtype="bf16")
    if not CUDA:
        info["note"] = "no GPU: reference only at a small size (interpreter timings are not performance figures)"
    if CUDA:
        if mode == "fwd+jvp" and "reference_compiled" in impls:
            # The JVP baseline is torch.func.jvp of the eager reference; a compiled jvp is not a baseline here.
            del impls["reference_compiled"]
        # Parity before any speedup: Triton against the eager reference on the same inputs.
        got, ref = impls["triton"](x, h, shift, scale, gate), impls["reference"](x, h, shift, scale, gate)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        reps = 20 if full else 5
        times = {name: median_seconds(runner(op), reps) for name, op in impls.items()}
        nbytes = _bytes(mode, B, L, D, 2)
        info.update({f"ms_{k}": v * 1e3 for k, v in times.items()})
        info["gbps_triton"] = nbytes / times["triton"] / 1e9
        info.update({f"speedup_vs_{k}": v / times["triton"] for k, v in times.items() if k != "triton"})
        # GPU time by CUDA-graph replay: the kernels alone, without Python and launch overhead (which the wall times
        # above include: at these sizes the Triton path's wall time is mostly host overhead).
        from triton.testing import do_bench_cudagraph
        gpu = {}
        for name, op in impls.items():
            try:
                gpu[name] = do_bench_cudagraph(runner(op), rep=20) * 1e-3
            except Exception as e:  # capture can fail for a baseline; the wall-clock numbers stand
                info[f"gpu_ms_{name}"] = f"capture failed: {type(e).__name__}"
        info.update({f"gpu_ms_{k}": v * 1e3 for k, v in gpu.items()})
        if "triton" in gpu:
            info["gpu_gbps_triton"] = nbytes / gpu["triton"] / 1e9
            info.update({f"gpu_speedup_vs_{k}": v / gpu["triton"] for k, v in gpu.items() if k != "triton"})
        main = runner(impls["triton"])
    else:
        main = runner(impls["reference"])
    benchmark.extra_info.update(info)
    benchmark.pedantic(main, rounds=10 if full else 3, warmup_rounds=1)


def test_copy_bandwidth(benchmark, full, env_info):
    """Device copy bandwidth (read + write), the floor the forward's GB/s is compared with."""
    if not CUDA:
        pytest.skip("no GPU: copy bandwidth is measured on GPUs only")
    n = 2 * 8346 * 1536 * (4 if full else 1)
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = median_seconds(lambda: b.copy_(a), 20)
    from triton.testing import do_bench_cudagraph
    t_gpu = do_bench_cudagraph(lambda: b.copy_(a), rep=20) * 1e-3
    benchmark.extra_info.update(dict(env_info, gbps_copy=2 * a.numel() * 2 / t / 1e9,
                                     gpu_gbps_copy=2 * a.numel() * 2 / t_gpu / 1e9))
    benchmark.pedantic(lambda: b.copy_(a), rounds=10, warmup_rounds=1)
