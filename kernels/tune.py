"""Measure the Triton kernels' launch configurations on this GPU: ``python -m kernels.tune [--budget SECONDS]``.

For each pass (adaLN fwd / bwd / tangent at D = 1536; attention fwd / tangent / dkdv / dq at D = 64, bf16) and each
candidate configuration, the raw launcher is timed by CUDA-graph replay (``triton.testing.do_bench_cudagraph``:
GPU time without Python or launch overhead) at the DiT4SR shapes of the benchmarks. One JSON row per measurement on
stdout, then the best configuration per pass. The tables in kernels/adaln.py and kernels/flash.py are set from
these measurements (and must stay spill-free: tests/test_gpu_readiness.py). A time budget stops the sweep early
and still prints what was measured.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench_cudagraph

import kernels
from kernels import adaln, tiles

flash = kernels.flash

ADALN = {
    "fwd": [(r, w) for r in (1, 2, 4) for w in (4, 8, 16)],
    "tangent": [(r, w) for r in (1, 2, 4) for w in (4, 8, 16)],
    "bwd": [(r, w) for r in (4, 8, 16, 32) for w in (4, 8, 16)],
}
ATTN = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (64, 64, 4, 3),
            (128, 32, 4, 4)],
    "tangent": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
            (128, 32, 4, 3)],
    "fused": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 3),
              (128, 128, 8, 2)],
    "dkdv": [(64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2), (128, 128, 8, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 64, 4, 3), (64, 64, 8, 3), (128, 128, 8, 2)],
}


def _ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30)


def tune_adaln(B: int, L: int, D: int, deadline: float):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, h, dy, dxr, tx, th = (torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(6))
    shift, scale, gate, ts, tc, tg = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
                                      for _ in range(6))
    y, xres, mean, rstd = adaln.adaln_fwd(x, shift, scale, gate, h, 1e-6)
    n = B * L * D * 2
    calls = {
        "fwd": (lambda: adaln.adaln_fwd(x, shift, scale, gate, h, 1e-6), 4 * n),
        "tangent": (lambda: adaln.adaln_tangent(xres, h, tx, th, scale, gate, ts, tc, tg, mean, rstd), 5 * n),
        "bwd": (lambda: adaln.adaln_bwd(dy, dxr, xres, h, scale, gate, mean, rstd), 6 * n),
    }
    original = tiles.adaln
    try:
        for kind, cands in ADALN.items():
            for rpp, warps in cands:
                if time.monotonic() > deadline:
                    return
                BD = triton.next_power_of_2(D)
                tiles.adaln = lambda D_, backward=False, c=(BD, warps, rpp): c
                fn, nbytes = calls[kind]
                try:
                    ms = _ms(fn)
                except Exception as e:  # a configuration that does not compile or launch is reported, not fatal
                    yield dict(op="adaln", kind=kind, L=L, rpp=rpp, warps=warps, error=str(e)[:200])
                    continue
                yield dict(op="adaln", kind=kind, L=L, rpp=rpp, warps=warps, ms=ms, gbps=nbytes / ms / 1e6)
    finally:
        tiles.adaln = original


def tune_attention(B: int, H: int, L: int, D: int, deadline: float, passes=tuple(ATTN)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
                               for _ in range(7))
    scale = D ** -0.5
    o, lse = flash.attn_fwd(q, k, v, scale)
    calls = {
        "fwd": (lambda: flash.attn_fwd(q, k, v, scale), 4),
        "tangent": (lambda: flash.attn_tangent(q, k, v, tq, tk, tv, o, lse, scale), 10),
        "fused": (lambda: flash.attn_fwd_tangent(q, k, v, tq, tk, tv, scale), 12),
        "dkdv": (lambda: flash.attn_bwd(do, q, k, v, o, lse, scale), 10),
        "dq": (lambda: flash.attn_bwd(do, q, k, v, o, lse, scale), 10),
    }
    table = tiles.ATTENTION_16[90]
    tiles.OVERRIDES = {}  # the sweep sets the table itself
    for kind in passes:
        cands = ATTN[kind]
        default = table[kind][D]
        try:
            for cfg in cands:
                if time.monotonic() > deadline:
                    return
                table[kind][D] = cfg
                fn, mults = calls[kind]
                row = dict(op="attention", kind=kind, L=L, BM=cfg[0], BN=cfg[1], warps=cfg[2], stages=cfg[3])
                try:
                    ms = _ms(fn)
                except Exception as e:
                    yield dict(row, error=str(e)[:200])
                    continue
                # tangent pass: 5 matmuls; fused: 6; dkdv/dq rows time the whole backward (both kernels, 5 matmuls).
                yield dict(row, ms=ms, tflops=mults * B * H * L * L * D / ms / 1e9)
        finally:
            table[kind][D] = default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep")
    ap.add_argument("--only", choices=("adaln", "attention"), help="sweep one kernel family")
    ap.add_argument("--passes", default="", help="attention passes to sweep, comma-separated (default: all)")
    ap.add_argument("--write", metavar="FILE", help="write the best attention tiles as JSON, for MFSR_ATTN_TILES")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.tune measures GPU kernels: no CUDA device here")
    deadline = time.monotonic() + args.budget
    a = torch.empty(2 * 8346 * 1536 * 4, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = _ms(lambda: b.copy_(a))
    rows = [dict(op="copy", kind="copy", bytes=4 * a.numel(), ms=ms, gbps=4 * a.numel() / ms / 1e6)]
    print(json.dumps(rows[0]), flush=True)
    passes = [p for p in args.passes.split(",") if p] or list(ATTN)
    gens = []
    if args.only in (None, "adaln"):
        gens.append(tune_adaln(2, 8346, 1536, deadline))
    if args.only in (None, "attention"):
        gens.append(tune_attention(2, 24, 8346, 64, deadline, passes))
    for gen in gens:
        for row in gen:
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("best per pass (GPU time by CUDA-graph replay):")
    tiles = {}
    for op, kind in [("adaln", k) for k in ADALN] + [("attention", k) for k in ATTN]:
        ok = [r for r in rows if r["op"] == op and r["kind"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"  {op} {kind}: {json.dumps(best)}")
            # dkdv and dq rows time the pair: not separable
            if op == "attention" and kind in ("fwd", "tangent", "fused"):
                tiles[kind] = [best["BM"], best["BN"], best["warps"], best["stages"]]
    if args.write:
        arch = tiles.arch_family(torch.device("cuda"))
        with open(args.write, "w") as f:
            json.dump({"arch": arch, "dtype": "16-bit", "head_dim": 64, "tiles": tiles}, f)
        print(f"wrote {args.write}: use it with MFSR_ATTN_TILES={args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
