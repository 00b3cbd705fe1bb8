"""One training step of the student: flow matching vs MeanFlow vs a full distillation step, reference vs Triton path.

- ``fm``: forward + backward at r = t (plain flow matching);
- ``mf_explicit``: the model's explicit tangent pass (``forward(..., tangents=...)``: u and du/dt in one call, no
  torch.func transform), u back-propagated: what ``training.distill`` runs;
- ``mf_jvp``: one ``torch.func.jvp`` whose primal output is back-propagated;
- ``mf_split``: a no-grad JVP for du/dt plus an ordinary forward + backward for u;
- ``distill``: the teacher's guided velocity (one no-grad pass over the [negative; positive] batch, w = 8), then the
  student's ``mf_explicit`` step with it as target and tangent (DESIGN section 3). The teacher is a second model of
  the student's size.

CPU (any size): the ``tiny`` preset in fp32 on the reference path; the Triton path is skipped there (interpreter
timings are not performance figures). GPU with ``--benchmark``: a 4-block slice of the ``dit4sr`` preset (hidden 1536,
24 heads of 64, the LR stream, two dual-attention blocks) in bf16 at the 512 px shape (1024 latent tokens per image
stream, 154 context tokens: L = 2202 in joint attention), batch 2 (and batch 8 for ``fm`` and ``mf_explicit``, where
the GPU rather than the host bounds the step), on both paths. ``extra_info`` holds the step time,
the peak GPU memory and, for the Triton path, the speedup over the reference path for the same step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timing import median_seconds, peak_mb

from mfsr_fast import MFSRTransformer
from mfsr_fast.sampling.meanflow import adaptive_loss, meanflow_target

CUDA = torch.cuda.is_available()


def _setup(full: bool, batch: int = 2):
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    if CUDA and full:
        with torch.device(device):  # built on the GPU: initialising 0.4 B parameters on the CPU takes long
            m = MFSRTransformer.from_preset("dit4sr", num_layers=4, dual_attention_layers=(0, 1))
        B, C, S, Lc = batch, m.cfg.in_channels, 64, 154
        dtype = torch.bfloat16
    else:
        m = MFSRTransformer.from_preset("tiny").to(device)
        B, C, S, Lc = (8, 48, 32, 4) if full else (2, 48, 8, 4)
        dtype = torch.float32
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero init would make the step trivial
            p.normal_(std=0.02)
    m = m.to(dtype)
    z = torch.randn(B, C, S, S, device=device, dtype=dtype)
    lr = torch.randn_like(z)
    ctx = torch.randn(B, Lc, m.cfg.context_dim, device=device, dtype=dtype)
    pooled = torch.randn(B, m.cfg.pooled_dim, device=device, dtype=dtype)
    t = torch.rand(B, device=device)
    r = t * torch.rand(B, device=device)
    v = torch.randn_like(z)
    fn = lambda z_, t_, r_, **kw: m(z_, lr, t_, r_, context=ctx, pooled=pooled, **kw)  # noqa: E731
    return m, fn, z, t, r, v


def _teacher(m, z, t):
    """A teacher of the student's size and a function giving its guided velocity at (z, t)."""
    teacher = copy.deepcopy(m).requires_grad_(False)
    g = torch.Generator(device=z.device).manual_seed(1)
    B = z.shape[0]
    lr = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=g).repeat(2, 1, 1, 1)
    ctx = torch.randn(2 * B, 8, m.cfg.context_dim, device=z.device, dtype=z.dtype, generator=g)
    pooled = torch.randn(2 * B, m.cfg.pooled_dim, device=z.device, dtype=z.dtype, generator=g)

    @torch.no_grad()
    def guided(z_, t_, w=8.0):
        v_neg, v_pos = teacher(z_.repeat(2, 1, 1, 1), lr, t_.repeat(2), context=ctx, pooled=pooled).chunk(2)
        return v_neg + w * (v_pos - v_neg)
    return teacher, guided


def _step(m, fn, z, t, r, v, kind, guided=None):
    def step():
        m.zero_grad(set_to_none=True)
        if kind == "distill":
            v_t = guided(z, t)
            u, u_tgt = meanflow_target(fn, z, t, r, v_t, mode="explicit")
            loss = adaptive_loss(u, u_tgt)
        elif kind == "fm":
            loss = adaptive_loss(fn(z, t, t), v)
        else:
            u, u_tgt = meanflow_target(fn, z, t, r, v, mode=kind[3:])
            loss = adaptive_loss(u, u_tgt)
        loss.backward()
    return step


@pytest.mark.parametrize("kind,batch", [
    pytest.param(k, b, id=k if b == 2 else f"{k}-gpu-batch{b}")
    for k, b in [("fm", 2), ("mf_explicit", 2), ("mf_jvp", 2), ("mf_split", 2), ("distill", 2), ("fm", 8),
                 ("mf_explicit", 8)]])
def test_train_step(benchmark, full, env_info, kind, batch):
    if batch != 2 and not (CUDA and full):
        pytest.skip("batch 8 is a GPU size")
    m, fn, z, t, r, v = _setup(full, batch)
    teacher, guided = _teacher(m, z, t) if kind == "distill" else (None, None)
    info = dict(env_info, preset="dit4sr[:4 blocks]" if (CUDA and full) else "tiny", batch=z.shape[0],
                tokens_per_stream=(z.shape[-1] // 2) ** 2, dtype=str(z.dtype).replace("torch.", ""),
                full_size=full, shape=list(z.shape))
    if CUDA:
        # Same step on both paths; the reference path is the baseline.
        times = {}
        for backend in ("reference", "triton"):
            if teacher is not None:
                teacher.set_kernel_backend(backend)
            step = _step(m.set_kernel_backend(backend), fn, z, t, r, v, kind, guided)
            times[backend] = median_seconds(step, 5 if full else 2)
            info[f"ms_{backend}"] = times[backend] * 1e3
            info[f"peak_mb_{backend}"] = peak_mb(step)
        info["speedup_vs_reference"] = times["reference"] / times["triton"]
        info["memory_ratio_vs_reference"] = info["peak_mb_reference"] / max(info["peak_mb_triton"], 1e-6)
        backend = "triton"
    else:
        backend = "reference"
    for model in (m, teacher):
        if model is not None:
            model.set_kernel_backend(backend)
    step = _step(m, fn, z, t, r, v, kind, guided)
    benchmark.extra_info.update(info)

    def timed():
        step()
        if CUDA:
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=5 if full else 2, warmup_rounds=1)
