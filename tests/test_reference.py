"""kernels.reference: attention and adaLN ground truth, AD in both modes, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference


def _naive_attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.mark.parametrize("L,Lk,D", [(1, 1, 8), (63, 63, 32), (130, 70, 16)], ids=["L1", "L63", "L130xLk70"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["whole", "chunk7"])
def test_attention_math_matches_naive_fp64(L, Lk, D, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, D, generator=g, dtype=torch.float64) for n in (L, Lk, Lk))
    out = reference.attention_math(q, k, v, chunk=chunk)
    torch.testing.assert_close(out, _naive_attention(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.attention(q, k, v, scale=0.3), _naive_attention(q, k, v, 0.3),
                               rtol=1e-12, atol=1e-12)


def test_attention_lse_and_explicit_tangent_formula():
    g = torch.Generator().manual_seed(1)
    q, k, v, tq, tk, tv = (torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64) for _ in range(6))
    o, lse = reference.attention_lse(q, k, v)
    s = q @ k.transpose(-1, -2) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(o, _naive_attention(q, k, v))
    _, to_ad = torch.func.jvp(_naive_attention, (q, k, v), (tq, tk, tv))
    for chunk in (None, 5):  # whole rows at once, and in query chunks
        to = reference.attention_tangent(q, k, v, tq, tk, tv, chunk=chunk)
        torch.testing.assert_close(to, to_ad, rtol=1e-10, atol=1e-10)


def test_sdpa_cpu_has_no_forward_ad_but_reference_does():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda x: F.scaled_dot_product_attention(x, x, x), (q,), (q,))
    out, tan = torch.func.jvp(lambda x: kernels.attention(x, x, x), (q.double(),), (q.double(),))
    _, tan_ref = torch.func.jvp(lambda x: _naive_attention(x, x, x), (q.double(),), (q.double(),))
    torch.testing.assert_close(tan, tan_ref)


def test_reference_attention_forward_ad_with_dual_tensors_and_grad():
    import torch.autograd.forward_ad as fwAD
    g = torch.Generator().manual_seed(2)
    q, k, v, tq = (torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64) for _ in range(4))
    q.requires_grad_(True)
    with fwAD.dual_level():
        out = kernels.attention(fwAD.make_dual(q, tq), k, v)
        primal, tangent = fwAD.unpack_dual(out)
    _, tan_ref = torch.func.jvp(lambda x: _naive_attention(x, k, v), (q.detach(),), (tq,))
    torch.testing.assert_close(tangent, tan_ref)
    primal.sum().backward()
    q2 = q.detach().requires_grad_(True)
    _naive_attention(q2, k, v).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, H, L, D"):
        kernels.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="incompatible"):
        kernels.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="backend"):
        kernels.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), backend="cuda")


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import kernels
    torch.manual_seed(0)
    L, D, mode = int(sys.argv[1]), 32, sys.argv[2]
    q, k, v = (torch.randn(1, 1, L, D) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "forward":
        with torch.no_grad():
            out = kernels.attention(q, k, v)
    else:
        out, tan = torch.func.jvp(lambda a: kernels.attention(a, k, v), (q,), (torch.randn_like(q),))
        assert torch.isfinite(tan).all()
    assert torch.isfinite(out).all()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # MB
""")


@pytest.mark.parametrize("L,mode,full_gb", [(24576, "forward", 2.4), (16384, "jvp", 1.07)], ids=["forward", "jvp"])
def test_attention_does_not_materialise_scores(L, mode, full_gb):
    """One L x L fp32 score matrix alone would need full_gb GB; the reference must stay far below it."""
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(L), mode], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_mb = float(res.stdout.strip().splitlines()[-1])
    assert peak_mb < 0.6 * full_gb * 1024, f"peak growth {peak_mb:.0f} MB, one score matrix is {full_gb} GB"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "gated"])
def test_adaln_reference_formula(dtype, with_residual):
    g = torch.Generator().manual_seed(3)
    B, L, D = 3, 17, 40
    x, h = (torch.randn(B, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    shift, scale, gate = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    xr = x + gate[:, None] * h if with_residual else x
    mean = xr.mean(-1, keepdim=True)
    var = ((xr - mean) ** 2).mean(-1, keepdim=True)
    y64 = (xr - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    args = [t.to(dtype) for t in (x, shift, scale)]
    if with_residual:
        xo, y = reference.adaln_modulate(*args, gate=gate.to(dtype), h=h.to(dtype))
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(xo.double(), xr, rtol=tol, atol=tol)
    else:
        y = reference.adaln_modulate(*args)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-1}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)


def test_adaln_accepts_b1d_and_rejects_bad_modulation():
    x = torch.randn(2, 5, 8)
    s = torch.randn(2, 8)
    torch.testing.assert_close(kernels.adaln_modulate(x, s, s), kernels.adaln_modulate(x, s[:, None], s[:, None]))
    with pytest.raises(ValueError, match="shift"):
        kernels.adaln_modulate(x, torch.randn(3, 8), s)
    with pytest.raises(ValueError, match="gate and h"):
        kernels.adaln_modulate(x, s, s, gate=s)
