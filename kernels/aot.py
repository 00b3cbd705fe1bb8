"""Ahead-of-time compilation of the Triton kernels for real GPUs on a machine without one (CI's GPU readiness check).

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` gives PTX and a cubin without a driver; the wheel's
``ptxas-blackwell -v`` (the plain ``ptxas`` beside it is older than the PTX Triton 3.9 emits) reports registers and
spills. Used by tests/test_gpu_readiness.py; also runnable as ``python -m kernels.aot`` for a table.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


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


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int) -> CompiledKernel:
    """Compile one configuration for sm_<arch> and read its register and spill counts from ``ptxas -v``."""
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
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
    return CompiledKernel(fn.__name__, arch, {**constexprs, "num_warps": num_warps}, ptx,
                          int(regs.group(1)) if regs else -1, int(spills.group(1)), int(spills.group(2)))


def main(argv=None) -> int:
    """Compile every configuration of every kernel for sm_90 and sm_80; print one JSON line per configuration."""
    import argparse
    import json

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="activation dtypes")
    parser.add_argument("--arch", default="90,80")
    args = parser.parse_args(argv)
    from kernels import adaln

    archs = tuple(int(a) for a in args.arch.split(","))
    dtypes = tuple(args.dtypes.split(","))
    configs = list(adaln.aot_configs(dtypes=("bf16",), archs=archs))
    # Other activation dtypes change only loads and stores: the widest row block covers their register pressure.
    others = tuple(d for d in dtypes if d != "bf16")
    if others:
        configs += list(adaln.aot_configs(dtypes=others, archs=archs, block_sizes=[adaln.MAX_D]))
    for fn, sig, constexprs, arch, num_warps in configs:
        k = compile_kernel(fn, sig, constexprs, arch, num_warps)
        print(json.dumps({"kernel": k.name, "arch": k.arch, "config": k.config, "registers": k.registers,
                          "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                          "dtype": sig[next(iter(sig))]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
