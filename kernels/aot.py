"""Ahead-of-time compilation of the Triton kernels for real GPUs on a machine without one (CI's GPU readiness check).

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` gives PTX and a cubin without a driver; the wheel's
``ptxas-blackwell -v`` (the plain ``ptxas`` beside it is older than the PTX Triton 3.9 emits) reports registers and
spills. Used by tests/test_gpu_readiness.py; also runnable as ``python -m kernels.aot`` for a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import adaln, flash


@dataclass
class CompiledKernel:
    name: str
    arch: int
    config: dict
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int


def ptxas_path() -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {bindir}")


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, options) -> CompiledKernel:
    """Compile one configuration for sm_<arch> and read its register and spill counts from ``ptxas -v``.

    options: num_warps (int) or a dict of compile options (num_warps, num_stages).
    """
    options = {"num_warps": options} if isinstance(options, int) else dict(options)
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {fn.__name__} {constexprs}: {res.stderr[-2000:]}")
    log = res.stdout + res.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return CompiledKernel(fn.__name__, arch, {**constexprs, **options}, ptx,
                          int(regs.group(1)) if regs else -1, int(spills.group(1)), int(spills.group(2)))


def main(argv=None) -> int:
    """Compile every configuration of every kernel for sm_90 and sm_80; print one JSON line per configuration."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="activation dtypes")
    parser.add_argument("--arch", default="90,80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    dtypes = tuple(args.dtypes.split(","))
    configs = list(adaln.aot_configs(dtypes=("bf16",), archs=archs))
    # Other activation dtypes change only loads and stores: the widest row block covers their register pressure.
    others = tuple(d for d in dtypes if d != "bf16")
    if others:
        configs += list(adaln.aot_configs(dtypes=others, archs=archs, block_sizes=[adaln.MAX_D]))
    configs += list(flash.aot_configs(dtypes=tuple(d for d in ("bf16", "fp32") if d in dtypes), archs=archs))
    # Kernels travel to the worker processes by module and name.
    jobs = [(fn.fn.__module__, fn.fn.__name__, *rest) for fn, *rest in configs]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for line in pool.map(_compile_row, jobs):
            print(line, flush=True)
    return 0


def _compile_row(job) -> str:
    module, name, sig, constexprs, arch, options = job
    fn = getattr(importlib.import_module(module), name)
    k = compile_kernel(fn, sig, constexprs, arch, options)
    return json.dumps({"kernel": k.name, "arch": k.arch, "config": k.config, "registers": k.registers,
                       "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                       "dtype": sig[next(iter(sig))], "wgmma": "wgmma" in k.ptx})


if __name__ == "__main__":
    raise SystemExit(main())
