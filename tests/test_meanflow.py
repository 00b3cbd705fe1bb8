"""MeanFlow core: (t, r) sampling, the JVP target, the adaptive loss and the sampler, checked analytically."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import micro_inputs, micro_model

from mfsr_fast import MFSRTransformer
from mfsr_fast.sampling.config import SamplerConfig
from mfsr_fast.sampling.meanflow import adaptive_loss, meanflow_target, sample, sample_t_r, time_grid


class GaussianFlow:
    """Exact fields for data x ~ N(m, Q diag(s^2) Q^T) and noise e ~ N(0, I), z_t = (1 - t) x + t e.

    In the eigenbasis each coordinate follows z_t = (1 - t) mu + sigma_t xi along its trajectory, with
    sigma_t = sqrt((1 - t)^2 s^2 + t^2) and xi fixed; so v = -mu + sigma_t' xi and u(z, r, t) = (z_t - z_r) / (t - r).
    """

    def __init__(self, d=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.s = 0.3 + torch.rand(d, generator=g, dtype=torch.float64)  # std per eigen-direction
        self.m = torch.randn(d, generator=g, dtype=torch.float64)
        self.mu = self.Q.T @ self.m
        self.cov = self.Q @ torch.diag(self.s ** 2) @ self.Q.T

    def _sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)  # (B, d)

    def _xi(self, z, t):
        w = z @ self.Q  # (B, d) coordinates in the eigenbasis
        return (w - (1 - t) * self.mu) / self._sigma(t)

    def v(self, z, t):
        t = t[:, None]
        sig = self._sigma(t)
        dsig = (t - (1 - t) * self.s ** 2) / sig
        return (-self.mu + dsig * self._xi(z, t)) @ self.Q.T

    def u(self, z, t, r):
        tt, rr = t[:, None], r[:, None]
        xi = self._xi(z, tt)
        w_r = (1 - rr) * self.mu + self._sigma(rr) * xi
        eq = (tt - rr).abs() < 1e-12
        u = (z @ self.Q - w_r) / torch.where(eq, torch.ones_like(tt), tt - rr)
        return torch.where(eq, self.v(z, t) @ self.Q, u) @ self.Q.T

    def sample_zt(self, t, g):
        x = self.m + torch.randn(t.shape[0], self.m.shape[0], generator=g, dtype=torch.float64) @ (
            self.Q @ torch.diag(self.s)).T
        e = torch.randn(x.shape, generator=g, dtype=torch.float64)
        return (1 - t[:, None]) * x + t[:, None] * e


def test_target_from_exact_average_velocity_is_exact():
    flow = GaussianFlow()
    g = torch.Generator().manual_seed(1)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    r = t * torch.rand(64, generator=g, dtype=torch.float64)
    r[:8] = t[:8]  # r = t: the target reduces to v
    z = flow.sample_zt(t, g)
    v = flow.v(z, t)
    u, u_tgt = meanflow_target(flow.u, z, t, r, v)
    torch.testing.assert_close(u, flow.u(z, t, r))
    torch.testing.assert_close(u_tgt, u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u_tgt[:8], v[:8], rtol=1e-9, atol=1e-9)
    # Sensitivity: the wrong tangent for r (tangents (v, 1, 1)) gives a different target.
    _, dudt_wrong = torch.func.jvp(flow.u, (z, t, r), (v, torch.ones_like(t), torch.ones_like(r)))
    wrong = v - (t - r)[:, None] * dudt_wrong
    assert (wrong[8:] - u[8:]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_sampling_with_exact_average_velocity_reaches_the_data_distribution(steps):
    flow = GaussianFlow()
    g = torch.Generator().manual_seed(2)
    n = 40000
    e = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = sample(flow.u, e, steps=steps)
    mean_tol = 5 * flow.s.max().item() / math.sqrt(n)
    assert (x.mean(0) - flow.m).abs().max() < mean_tol
    torch.testing.assert_close(torch.cov(x.T), flow.cov, rtol=0, atol=0.05 * flow.cov.abs().max().item())
    # Sensitivity: one Euler step with the instantaneous velocity does not reach the data covariance.
    x_euler = e - flow.v(e, torch.ones(n, dtype=torch.float64))
    assert (torch.cov(x_euler.T) - flow.cov).abs().max() > 0.1 * flow.cov.abs().max()


def test_model_jvp_matches_central_finite_differences_fp64():
    m = micro_model(dtype=torch.float64)
    inp = micro_inputs(m)
    z, lr, ctx, pooled = inp["z"], inp["lr"], inp["context"], inp["pooled"]
    t = torch.tensor([0.6, 0.8], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5], dtype=torch.float64)
    v = torch.randn_like(z)

    def fn(z_, t_, r_):
        return m(z_, lr, t_, r_, context=ctx, pooled=pooled)

    with torch.no_grad():
        _, tangent = torch.func.jvp(fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        eps = 1e-6
        fd = (fn(z + eps * v, t + eps, r) - fn(z - eps * v, t - eps, r)) / (2 * eps)
    rel = ((tangent - fd).abs().max() / fd.abs().max()).item()
    assert rel < 1e-6, rel
    assert fd.abs().max() > 1e-3  # the check is not vacuous


def test_jvp_through_tiny_preset_with_parameter_gradients_both_modes():
    torch.manual_seed(0)
    m = MFSRTransformer.from_preset("tiny")
    from conftest import randomize_
    randomize_(m, std=0.05)
    B = 2
    z_t = torch.randn(B, 48, 8, 8)
    lr = torch.randn_like(z_t)
    ctx = torch.randn(B, 4, m.cfg.context_dim)
    pooled = torch.randn(B, m.cfg.pooled_dim)
    t = torch.tensor([0.9, 0.4])
    r = torch.tensor([0.1, 0.4])
    v = torch.randn_like(z_t)
    fn = lambda z, t_, r_: m(z, lr, t_, r_, context=ctx, pooled=pooled)  # noqa: E731
    grads = []
    outs = []
    for mode in ("jvp", "split"):
        m.zero_grad()
        u, u_tgt = meanflow_target(fn, z_t, t, r, v, mode=mode)
        assert u.requires_grad and not u_tgt.requires_grad
        adaptive_loss(u, u_tgt).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        outs.append((u.detach(), u_tgt))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    # fp32 with 1000 t inside the time embedding: tangents are large, compare relative to their scale.
    scale = outs[0][1].abs().max()
    assert (outs[0][1] - outs[1][1]).abs().max() <= 1e-5 * scale
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(torch.isfinite(g).all() for g in grads[0].values())
    # r = t for sample 1: its target is v itself.
    torch.testing.assert_close(outs[0][1][1], v[1])


def test_sample_t_r_distribution():
    g = torch.Generator().manual_seed(0)
    t, r = sample_t_r(20000, generator=g)
    assert (r <= t).all() and (t > 0).all() and (t < 1).all()
    assert abs((r == t).float().mean().item() - 0.75) < 0.02
    t0, r0 = sample_t_r(20000, equal_fraction=0.0, generator=g, mean=0.5, std=0.5)
    assert (r0 < t0).all()
    logits = torch.logit(torch.cat([t0, r0]).double())
    assert abs(logits.mean().item() - 0.5) < 0.02 and abs(logits.std().item() - 0.5) < 0.02
    t1, r1 = sample_t_r(100, equal_fraction=1.0, generator=g)
    assert torch.equal(t1, r1)
    with pytest.raises(ValueError):
        sample_t_r(4, equal_fraction=1.5)


def test_adaptive_loss_value_and_stop_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    c, p = 1e-3, 1.0
    loss = adaptive_loss(pred, target, p=p, c=c, reduce=False)
    L = ((pred - target) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(loss, L / (L + c) ** p)
    loss.mean().backward()
    expected = 2 * (pred - target) / ((L.detach() + c) ** p)[:, None, None, None] / 3
    torch.testing.assert_close(pred.grad, expected)
    pred.grad = None
    adaptive_loss(pred, target, p=0.0).backward()  # p = 0: plain summed squared error
    torch.testing.assert_close(pred.grad, 2 * (pred - target) / 3)


def test_sampler_grid_and_validation():
    calls = []
    out = sample(lambda z, t, r: torch.zeros_like(z) + (t - r)[:, None], torch.zeros(2, 1), steps=4,
                 callback=lambda i, z: calls.append(i))
    assert calls == [0, 1, 2, 3]
    torch.testing.assert_close(out, -torch.full((2, 1), 4 * 0.25 ** 2))
    torch.testing.assert_close(time_grid(2), torch.tensor([1.0, 0.5, 0.0]))
    # refine_t: one jump to refine_t, then equal steps to 0; one step is [1, 0] either way.
    torch.testing.assert_close(time_grid(4, refine_t=0.06), torch.tensor([1.0, 0.06, 0.04, 0.02, 0.0]))
    torch.testing.assert_close(time_grid(2, refine_t=0.1), torch.tensor([1.0, 0.1, 0.0]))
    torch.testing.assert_close(time_grid(1, refine_t=0.1), torch.tensor([1.0, 0.0]))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="refine_t"):
            time_grid(2, refine_t=bad)
    # refine_side "above": equal steps from 1 down to refine_t, then one jump to 0; the same as "below" for N <= 2
    # and for refine_t 0 (uniform).
    torch.testing.assert_close(time_grid(4, refine_t=0.7, refine_side="above"),
                               torch.tensor([1.0, 0.9, 0.8, 0.7, 0.0]))
    torch.testing.assert_close(time_grid(3, refine_t=0.5, refine_side="above"), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    for n in (1, 2):
        torch.testing.assert_close(time_grid(n, refine_t=0.3, refine_side="above"), time_grid(n, refine_t=0.3))
    torch.testing.assert_close(time_grid(4, refine_side="above"), time_grid(4))
    with pytest.raises(ValueError, match="refine_side"):
        time_grid(4, refine_t=0.5, refine_side="left")
    assert SamplerConfig(refine_t=0.7, refine_side="above").grid(4)[-2].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="refine_side"):
        SamplerConfig(refine_side="middle")
    with pytest.raises(ValueError):
        sample(lambda z, t, r: z, torch.zeros(1, 1), timesteps=[0.0, 1.0])
    with pytest.raises(ValueError):
        sample(lambda z, t, r: z, torch.zeros(1, 1), steps=0)
    with pytest.raises(ValueError, match="jump must be"):
        sample(lambda z, t, r: z, torch.zeros(1, 1), steps=2, jump="midpoint")
    with pytest.raises(ValueError, match="mode"):
        meanflow_target(lambda z, t, r: z, torch.zeros(1, 1), torch.ones(1), torch.zeros(1), torch.zeros(1, 1),
                        mode="bad")


def test_endpoint_jumps_ask_for_the_one_step_velocity():
    """jump="endpoint": every jump asks u(z_t, 0, t) and moves (t - r) along it; one step is the same as "average"."""
    asked = []

    def u(z, t, r):
        asked.append(round(float(r[0]), 6))
        return torch.zeros_like(z) + (10 * t + r)[:, None]

    grid = [1.0, 0.5, 0.0]
    avg = sample(u, torch.zeros(1, 1), timesteps=grid)
    end = sample(u, torch.zeros(1, 1), timesteps=grid, jump="endpoint")
    assert asked == [0.5, 0.0, 0.0, 0.0]
    torch.testing.assert_close(avg, torch.tensor([[-(0.5 * 10.5 + 0.5 * 5)]]))
    torch.testing.assert_close(end, torch.tensor([[-(0.5 * 10 + 0.5 * 5)]]))
    torch.testing.assert_close(sample(u, torch.ones(1, 1), steps=1, jump="endpoint"), sample(u, torch.ones(1, 1)))
    # Geometry: the jump lands on the straight line from the one-step estimate x = z - t u(z, 0, t) through z.
    g = torch.Generator().manual_seed(3)
    z0, x_hat = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    to_x = lambda z, t, r: (z - x_hat) / t[:, None]  # noqa: E731  (u(z, 0, t) = (z - x) / t for any r asked)
    z_r = sample(to_x, z0, timesteps=[0.8, 0.3], jump="endpoint")
    torch.testing.assert_close(z_r, 0.3 / 0.8 * z0 + (1 - 0.3 / 0.8) * x_hat)
