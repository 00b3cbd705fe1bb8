"""Flash-attention benchmarks: forward, forward+JVP and backward at DiT4SR shapes.

On a GPU with ``--benchmark``: B = 2, H = 24, D = 64, L = 2202 and 8346 (512 and 1024 px outputs with three streams),
bf16. Baselines timed in the same test: SDPA's flash backend (forward, backward), ``torch.func.jvp`` over SDPA's math
backend (forced; the fused backends have no forward-mode AD), and xformers' memory-efficient attention when installed.
The Triton forward+JVP is ``attention_with_tangent`` (what the model's explicit tangent pass calls in training) with
the fused single-pass kernel (``triton``) and with the forward kernel then the tangent pass (``triton_two_pass``);
``torch.func.jvp`` over the Triton kernel (``triton_func_jvp``: the two passes plus functorch's per-call host work) is
timed beside them. Besides the wall time of one isolated call, ``gpu_ms_triton`` is the kernels' GPU time by
CUDA-graph replay (``triton.testing.do_bench_cudagraph``).
FLOP counts (non-causal, Lq = Lk = L): forward 4 B H L^2 D (two matmuls); forward+JVP 12 B H L^2 D (six matmuls, the
streamed formula's count; the Triton path actually runs 7: forward 2 + tangent pass 5); backward 10 B H L^2 D (the
usual 2.5x forward). ``extra_info`` holds TFLOP/s, peak memory and the ratios. Parity is checked before any speedup.
Without a GPU: a small size of the reference only, and ``extra_info`` says so.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from timing import median_seconds, peak_mb

import kernels

CUDA = torch.cuda.is_available()
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend]

    def f(q, k, v):
        with sdpa_kernel(b):
            return F.scaled_dot_product_attention(q, k, v)
    return f


def _xformers(q, k, v):
    import xformers.ops as xops
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _triton(q, k, v):
    return kernels.attention(q, k, v, backend="triton")


def _impls(mode: str, q, k, v, tq, tk, tv, do):
    """(the implementations timed for ``mode`` by name, ``run(impl)`` -> a call to time)."""
    if mode == "fwd+jvp":
        impls = {"triton": True, "triton_two_pass": False, "triton_func_jvp": _triton, "jvp_sdpa_math": _sdpa("math")}

        def run(f):
            if isinstance(f, bool):  # the explicit entry point: fused single pass, or forward then tangent pass
                return lambda: kernels.flash.attention_with_tangent(q, k, v, tq, tk, tv, fused=f)
            return lambda: torch.func.jvp(f, (q, k, v), (tq, tk, tv))
        return impls, run
    impls = {"triton": _triton, "sdpa_flash": _sdpa("flash")}
    if HAS_XFORMERS:
        impls["xformers"] = _xformers
    if mode == "fwd":
        return impls, lambda f: (lambda: f(q, k, v))

    def run(f):
        qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = f(qs, ks, vs)
        return lambda: torch.autograd.grad(out, (qs, ks, vs), do, retain_graph=True)
    return impls, run


def _check_parity(q, k, v, tq, tk, tv) -> None:
    """Parity before any speedup: Triton against SDPA (math in fp32 for the tangent) on the same inputs."""
    o_t, t_t = torch.func.jvp(_triton, (q, k, v), (tq, tk, tv))
    o_e, t_e = kernels.flash.attention_with_tangent(q, k, v, tq, tk, tv, fused=True)
    qf, kf, vf, tqf, tkf, tvf = (x[:, :2].float() for x in (q, k, v, tq, tk, tv))
    o_r, t_r = torch.func.jvp(_sdpa("math"), (qf, kf, vf), (tqf, tkf, tvf))
    for o_x, t_x in ((o_t, t_t), (o_e, t_e)):
        torch.testing.assert_close(o_x[:, :2].float(), o_r, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(t_x[:, :2].float(), t_r, rtol=5e-2, atol=5e-2 * t_r.abs().max().item())


def _measure(info: dict, impls: dict, run, flops: int, reps: int) -> None:
    """Wall time and peak memory of each implementation, the kernels' GPU time, TFLOP/s and the ratios."""
    from triton.testing import do_bench_cudagraph

    for name, f in impls.items():
        try:
            fn = run(f)
            info[f"ms_{name}"] = median_seconds(fn, reps) * 1e3
            info[f"peak_mb_{name}"] = peak_mb(fn)
        except torch.OutOfMemoryError:
            info[f"ms_{name}"] = "OOM"
            torch.cuda.empty_cache()
    info["tflops_triton"] = flops / (info["ms_triton"] * 1e-3) / 1e12
    for name in [n for n in impls if n in ("triton", "triton_two_pass")]:
        try:  # GPU time of the kernels alone (CUDA-graph replay), next to the wall time of one isolated call
            info[f"gpu_ms_{name}"] = do_bench_cudagraph(run(impls[name]), rep=50)
            info[f"gpu_tflops_{name}"] = flops / (info[f"gpu_ms_{name}"] * 1e-3) / 1e12
        except Exception as e:  # capture can fail (e.g. autograd's host work in the backward): say so
            info[f"gpu_ms_{name}"] = f"not measured: {type(e).__name__}: {str(e)[:120]}"
    if isinstance(info.get("ms_triton_two_pass"), float):
        info["tflops_triton_two_pass"] = flops / (info["ms_triton_two_pass"] * 1e-3) / 1e12
    for name in impls:
        if not name.startswith("triton") and isinstance(info[f"ms_{name}"], float):
            info[f"speedup_vs_{name}"] = info[f"ms_{name}"] / info["ms_triton"]
            info[f"memory_ratio_vs_{name}"] = info[f"peak_mb_{name}"] / max(info["peak_mb_triton"], 1e-6)


@pytest.mark.parametrize("mode", ["fwd", "fwd+jvp", "bwd"])
@pytest.mark.parametrize("L", [2202, 8346])
def test_attention(benchmark, full, env_info, mode, L):
    B, H, D = 2, 24, 64
    if not (CUDA and full):
        L = min(L, 512) if CUDA else 128
        H = H if CUDA else 4
    dtype = torch.bfloat16
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, tq, tk, tv, do = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(7))
    flops = {"fwd": 4, "fwd+jvp": 12, "bwd": 10}[mode] * B * H * L * L * D
    impls, run = _impls(mode, q, k, v, tq, tk, tv, do)
    info = dict(env_info, mode=mode, shape=[B, H, L, D], dtype="bf16", flops=flops)
    if not CUDA:
        info["note"] = "no GPU: reference only at a small size (interpreter timings are not performance figures)"
        benchmark.extra_info.update(info)
        ref = lambda a, b, c: kernels.attention(a, b, c, backend="reference")  # noqa: E731
        benchmark.pedantic(run(ref) if mode != "fwd+jvp" else (
            lambda: kernels.attention_with_tangent(q, k, v, tq, tk, tv, backend="reference")), rounds=3,
            warmup_rounds=1)
        return
    _check_parity(q, k, v, tq, tk, tv)
    _measure(info, impls, run, flops, 10 if full else 3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(run(impls["triton"]), rounds=5 if full else 2, warmup_rounds=1)
