"""One distillation step's loss (DESIGN section 3): the MeanFlow rows, and the stored pairs of ``--trajectories``
riding in the same pass.

MeanFlow rows: z_t = (1 - t) x + t e from the batch, the teacher's guided velocity
    v_T   = v(z_t, t | LR, against) + w (v(z_t, t | LR, positive) - v(z_t, t | LR, against))
as both the target velocity and the tangent, and the student's target (MeanFlow eq. (8)-(10), stop-gradient)
    u_tgt = v_T - (t - r) (v_T . d_z u + d_t u).
Stored pairs (e, x_T) of a noise and the teacher's many-step sample from it (``training.trajectories``): the student's
one step from e regressed onto x_T, u(e, 0, 1) = e - x_T (Luhman and Luhman 2021), optionally onto a blend with an
anchor's one step, as the first jump of a multi-step grid, or from points of the straight line from e to x_T.
"""

from __future__ import annotations

import torch

from mfsr_fast.models.conditioning import lr_condition
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.sampling.config import TeacherSampling
from mfsr_fast.sampling.guidance import guided_velocity
from mfsr_fast.sampling.meanflow import adaptive_loss, meanflow_target, pair_t_r
from training import batches
from training.trajectories import DRAW_SALT

LINE_T_MIN = 0.01  # the smallest t of --trajectory-line's points (a 4-step grid at refine_t 0.06 ends at 0.02)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.detach().float() - b.detach().float()).pow(2).mean()


def meanflow_rows(cfg, teacher: MFSRTransformer, codec, model: MFSRTransformer, batch, how: TeacherSampling):
    """The batch's rows: (c, z, v_T, t, r), each sample's draws from its own seed."""
    hr, lr, restored, seeds = batch
    gens = batches.per_sample_generators(seeds)
    c = lr_condition(model, codec, lr, restored)  # as at inference
    x = model.to_flow(codec.encode(hr), c)  # the flow's space: x, or the scaled residual over R(LR)
    e = batches.per_sample_randn(gens, tuple(x.shape[1:])).to(x.device)
    a = batches.sample_t(gens, cfg)
    b = batches.logit_normal(gens, cfg.t_mean, cfg.t_std)
    equal = batches.per_sample_rand(gens) < cfg.equal_fraction
    # Half of the t = 1 draws train the one-step jump (r = 0); the rest keep r from the second draw, so the first
    # jump of a multi-step schedule (t = 1 to r > 0) is trained too.
    one_step = (a == 1) & ~equal & (batches.per_sample_rand(gens) < 0.5)
    t, r = pair_t_r(a, b, equal, one_step)
    t, r = t.to(x.device), r.to(x.device)
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    tdt = teacher.pos_embed.weight.dtype
    v_t = guided_velocity(teacher, z.to(tdt), c.to(tdt), t, how.weights(t), cfg.against).float()
    return c, z, v_t, t, r


def stored_rows(cfg, teacher: MFSRTransformer, codec, model: MFSRTransformer, traj, anchor, step: int, rank: int,
                device):
    """``trajectory_batch`` stored pairs drawn for this step and rank: (c, z, v, t, r) with v = e - x, x the stored
    sample (blended with the anchor's one step), z on the straight line from e to x (e itself at t = 1)."""
    g = torch.Generator().manual_seed(batches.sample_seed(cfg.seed ^ DRAW_SALT, step, rank))
    idx = torch.randint(len(traj), (cfg.trajectory_batch,), generator=g)
    e, x, lr, restored = (v.to(device) for v in traj.take(idx))
    c = lr_condition(model, codec, lr, restored)
    n = len(e)
    one, r = torch.ones(n, device=device), torch.zeros(n, device=device)
    if anchor is not None:  # the anchor's one step, blended in (only with mix < 1)
        tdt = teacher.pos_embed.weight.dtype
        with torch.no_grad():
            if anchor is teacher:  # one Euler step of the velocity field: r = t
                x_a = e - teacher.field(e.to(tdt), c.to(tdt), one, one, prompt="positive").float()
            else:
                x_a = e - anchor.field(e, c, one, r, prompt="positive").float()
        x = cfg.trajectory_mix * x + (1 - cfg.trajectory_mix) * x_a
    t = one
    if cfg.trajectory_refine > 0 or cfg.trajectory_line > 0:  # on the same line: velocity e - x again
        kind = torch.rand(n, generator=g)
        first = (kind < cfg.trajectory_refine).to(device)  # the first jump 1 -> refine_t
        r = torch.where(first, torch.full_like(r, cfg.refine_t), r)
        if cfg.trajectory_line > 0:  # a point of the line and a jump from it
            line = ((kind >= cfg.trajectory_refine) & (kind < cfg.trajectory_refine + cfg.trajectory_line))
            tl = LINE_T_MIN ** torch.rand(n, generator=g)
            rl = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, tl * torch.rand(n, generator=g))
            line = line.to(device)
            t = torch.where(line, tl.to(device), t)
            r = torch.where(line, rl.to(device), r)
    tb = t.view(-1, 1, 1, 1)
    return c, (1 - tb) * x + tb * e, e - x, t, r


def make_loss(cfg, teacher: MFSRTransformer, codec, traj=None, anchor=None):
    """The loss function ``training.loop.train`` calls each step."""
    how = TeacherSampling(cfg.guidance, cfg.against, interval=(cfg.guidance_above, 1.0))

    def loss_fn(field, model: MFSRTransformer, batch, step: int, d) -> tuple[torch.Tensor, dict]:
        """-> (the adaptive loss, its raw parts for the log: the mean squared error per element of the MeanFlow
        rows, ``mse``, and of the stored pairs, ``mse_traj``; the adaptive loss itself sits near 1 per term)."""
        c, z, v_t, t, r = meanflow_rows(cfg, teacher, codec, model, batch, how)
        B = z.shape[0]
        if traj is not None:  # the stored pairs ride in the same (DDP-synchronised) pass, as one-step jumps
            rows = stored_rows(cfg, teacher, codec, model, traj, anchor, step, d.rank, z.device)
            c, z, v_t, t, r = (torch.cat([a, b]) for a, b in zip((c, z, v_t, t, r), rows))
        mode = "explicit" if cfg.jvp_mode == "auto" else cfg.jvp_mode

        # The prompt is looked up inside forward, where FSDP has gathered the weights.
        def fn(z_, t_, r_, **kw):
            return field(z_, c, t_, r_, prompt="positive", **kw)

        def inner(z_, t_, r_):
            return model.field(z_, c, t_, r_, prompt="positive")

        with torch.autocast("cuda", enabled=not cfg.jvp_fp32 and torch.is_autocast_enabled()):
            u, u_tgt = meanflow_target(fn, z, t, r, v_t, mode=mode, jvp_fn=inner)
        loss = adaptive_loss(u[:B], u_tgt[:B], p=cfg.loss_p, c=cfg.loss_c)
        parts = {"mse": _mse(u[:B], u_tgt[:B])}
        if traj is not None:  # u(e, 0, 1) = e - x_T: the target is the stored velocity, not the MeanFlow one
            loss = loss + cfg.trajectory_weight * adaptive_loss(u[B:], v_t[B:], p=cfg.loss_p, c=cfg.loss_c)
            parts["mse_traj"] = _mse(u[B:], v_t[B:])
        return loss, parts
    return loss_fn
