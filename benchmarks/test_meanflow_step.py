"""One training step of the student on the CPU reference path: flow matching vs the two MeanFlow forms.

- ``fm``: forward + backward at r = t (plain flow matching);
- ``mf_jvp``: one ``torch.func.jvp`` whose primal output is back-propagated;
- ``mf_split``: a no-grad JVP for du/dt plus an ordinary forward + backward for u.
Ratios to ``fm`` are recorded in ``extra_info``; on a CUDA machine the same step runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from mfsr_fast import MFSRTransformer
from mfsr_fast.meanflow import adaptive_loss, meanflow_target


def _setup(full: bool):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = MFSRTransformer.from_preset("tiny").to(device)
    for p in m.parameters():  # adaLN-Zero init would make the step trivial
        torch.nn.init.normal_(p, std=0.02)
    B, S = (8, 32) if full else (2, 8)
    z = torch.randn(B, 48, S, S, device=device)
    lr = torch.randn_like(z)
    ctx = torch.randn(B, 4, m.cfg.context_dim, device=device)
    t = torch.rand(B, device=device)
    r = t * torch.rand(B, device=device)
    v = torch.randn_like(z)
    fn = lambda z_, t_, r_: m(z_, lr, t_, r_, context=ctx)  # noqa: E731
    return m, fn, z, t, r, v


@pytest.mark.parametrize("kind", ["fm", "mf_jvp", "mf_split"])
def test_train_step(benchmark, full, env_info, kind):
    m, fn, z, t, r, v = _setup(full)

    def step():
        m.zero_grad(set_to_none=True)
        if kind == "fm":
            loss = adaptive_loss(fn(z, t, t), v)
        else:
            u, u_tgt = meanflow_target(fn, z, t, r, v, mode=kind[3:])
            loss = adaptive_loss(u, u_tgt)
        loss.backward()
        if z.is_cuda:
            torch.cuda.synchronize()

    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"preset": "tiny", "batch": z.shape[0], "tokens_per_stream": (z.shape[-1] // 2) ** 2,
                                 "full_size": full})
    benchmark.pedantic(step, rounds=5 if full else 2, warmup_rounds=1)
