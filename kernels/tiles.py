"""Launch configurations of the Triton kernels, in one place: the attention tile tables per architecture family and
input width (measured where said, otherwise the largest spill-free tiles), a tile file's overrides (MFSR_ATTN_TILES,
written by ``python -m kernels.tune --write``), and the adaLN row blocks. The launchers look them up here at each
call, so ``kernels.tune`` sweeps by setting them."""

from __future__ import annotations

import json
import os

import torch

from kernels.common import INTERPRET

# (BM, BN, num_warps, num_stages) by (pass, head dim) for 16-bit inputs, per architecture family: tiles that compile
# without register spills (tests/test_gpu_readiness.py, ptxas -v). sm_90 covers Hopper and newer. Head dim 64 on
# sm_90 is the fastest spill-free tile of ``python -m kernels.tune`` on an H100 (docs/results/kernels.md; a 64x64
# backward tile with 3 stages was faster but spills under Triton 3.9). The other entries are the largest spill-free
# tiles, not yet timed, spill-free under both Triton 3.9 (here) and 3.6 (the GPU machine's: benchmarks/device_env.sh):
# under 3.6 the tangent pass at head dim 128 spilled with 64x32 tiles, so it takes 64x16.
ATTENTION_16 = {
    90: {"fwd": {32: (128, 64, 8, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
         "tangent": {32: (64, 64, 8, 2), 64: (128, 64, 8, 3), 128: (64, 16, 8, 2)},
         "fused": {32: (64, 64, 8, 2), 64: (128, 64, 8, 4)},
         "dkdv": {32: (64, 64, 8, 2), 64: (32, 64, 4, 2), 128: (32, 64, 8, 2)},
         "dq": {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2)}},
    80: {"fwd": {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (64, 64, 8, 2)},
         "tangent": {32: (64, 64, 8, 2), 64: (64, 32, 8, 2), 128: (32, 32, 8, 2)},
         "fused": {32: (64, 64, 8, 2), 64: (64, 32, 8, 2)},
         "dkdv": {32: (64, 64, 8, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2)},
         "dq": {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2)}},
}
# fp32 inputs use 3xTF32 dots (fp32-level accuracy) whose split operands need far more registers: small tiles, and
# no head dim 128 on GPUs (its tangent pass spills with every tile tried; 'auto' sends it to the reference).
ATTENTION_32 = {
    90: {"fwd": {32: (32, 32, 4, 2), 64: (32, 32, 4, 2)},
         "tangent": {32: (32, 16, 4, 2), 64: (16, 16, 4, 2)},
         "fused": {32: (32, 16, 4, 2), 64: (16, 16, 4, 2)},  # spill-free (ptxas -v), not measured
         "dkdv": {32: (32, 16, 4, 2), 64: (32, 16, 4, 2)},
         "dq": {32: (32, 32, 4, 2), 64: (32, 32, 4, 2)}},
}
# sm_80: the same, except the backward's dkdv at head dim 64 with 8 warps (4 spilled 16 bytes under Triton 3.6).
ATTENTION_32[80] = {**ATTENTION_32[90], "dkdv": {**ATTENTION_32[90]["dkdv"], 64: (32, 16, 8, 2)}}
GPU_FP32_HEAD_DIMS = (32, 64)


def arch_family(device: torch.device) -> int:
    """90 for Hopper and newer, 80 otherwise (Ampere, Ada)."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _read_overrides() -> dict:
    """Measured tiles from ``python -m kernels.tune --write FILE``, named by MFSR_ATTN_TILES=FILE: {(arch, kind, D):
    tile} for 16-bit inputs. They replace the table's entries on that architecture family (not checked for spills)."""
    path = os.environ.get("MFSR_ATTN_TILES")
    if not path:
        return {}
    try:
        with open(path) as f:
            spec = json.load(f)
        rename = {"jvp": "tangent"}  # the tangent pass's name in tile files written before it was renamed
        return {(int(spec["arch"]), rename.get(kind, kind), int(spec["head_dim"])): tuple(int(x) for x in tile)
                for kind, tile in spec["tiles"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"MFSR_ATTN_TILES={path}: not a tile file written by python -m kernels.tune ({e})") from e


OVERRIDES = _read_overrides()


def attention(D: int, kind: str, arch: int = 90, f32: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for a pass ("fwd", "tangent", "fused", "dkdv", "dq"); one small tile under the
    interpreter."""
    if INTERPRET:
        return 32, 32, 4, 1
    if not f32 and (arch, kind, D) in OVERRIDES:
        return OVERRIDES[(arch, kind, D)]
    return (ATTENTION_32 if f32 else ATTENTION_16)[arch][kind][D]


def adaln(D: int, backward: bool = False) -> tuple[int, int, int]:
    """(BD, num_warps, rows per program) for a row width D: next_pow2(D), warps by block size.

    The fastest of ``python -m kernels.tune`` on an H100 at D = 1536 (docs/results/kernels.md): one row per program
    with 4 warps for the forward and the tangent; 8 rows per program with 4 warps for the backward, whose per-program
    partial sums favour longer programs. Wider 16-warp programs and longer row loops were slower in every pass."""
    BD = 1 << (D - 1).bit_length()
    num_warps = max(1, min(8, BD // 512))
    rpp = 8 if backward else 1
    if INTERPRET:
        rpp = 4  # the interpreter runs the row loop in Python
    return BD, num_warps, rpp
