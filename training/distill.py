"""Distil a teacher into a one-step MeanFlow student: ``python -m training.distill --teacher DIR --data DIR``.

The student (teacher architecture + the h = t - r embedder; ``--grow-layers N``: N more blocks, which start as the
identity) starts as a copy of the teacher and learns the average velocity u(z_t, r, t) by the MeanFlow identity,
with the teacher's guided velocity as both the target velocity and the JVP tangent (DESIGN section 3):

    v_T   = v(z_t, t | LR, against) + w (v(z_t, t | LR, positive) - v(z_t, t | LR, against))
    u_tgt = v_T - (t - r) (v_T . d_z u + d_t u)       (stop-gradient; one forward-mode JVP)

Optionally mixed with the data velocity e - x (``data_mix``). ``--trajectories DIR`` (training.trajectories) adds
pairs (e, x_T) of a noise and the teacher's many-step sample from it, trained as one-step jumps (t = 1, r = 0) with
the target u = e - x_T in place of the MeanFlow one, in the same pass as the batch; ``--trajectory-anchor MODEL
--trajectory-mix M`` blends x_T with a frozen student's (or the teacher's) one step from e (M x_T + (1 - M) x_A), and
``--trajectory-refine S`` trains a share S of them as the jump 1 -> refine_t (a multi-step grid's first) and
``--trajectory-line S`` a share S at points of the straight line from e to x_T (steps 2-4's jumps). ``--refine-t``,
``--jump`` and ``--refine-side`` store the multi-step grid in the student's config from the start. The student
keeps the teacher's learned prompts and is conditioned on ``positive`` alone, so inference needs no text encoder and
no guidance pass.

``--teacher`` takes a training run folder (its newest checkpoint), a checkpoint folder (its EMA weights unless
``--no-teacher-ema``), a ``save_pretrained`` folder of an MFSRTransformer, or a DiT4SR-format / SD3.5 transformer
folder (``mfsr_fast.convert.load_transformer``). A teacher without stored prompts (DiT4SR, SD3.5) needs ``--prompts``,
a prompt-embedding file (``python -m mfsr_fast.prompts``); these embeddings are stored, frozen, in the student. Models
in SD3 VAE latent space need ``--vae``. The ``dit4sr`` preset is the real recipe (guidance 8.0 against the negative
prompt, bf16 autocast, FSDP2 over the GPUs under torchrun): see the README for memory needs.
The tangent du/dt comes from the model's explicit tangent pass (``jvp_mode='explicit'``, the default: one call of
the (DDP / FSDP-wrapped) model returns u and du/dt, see ``MFSRTransformer.forward``); ``jvp`` and ``split`` use
``torch.func.jvp`` instead (``split`` on the inner module under DDP, which ``torch.func.jvp`` cannot take).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from mfsr_fast.convert import load_teacher
from mfsr_fast.guidance import TeacherSampling, guided_velocity
from mfsr_fast.inference import lr_condition
from mfsr_fast.meanflow import JUMPS, REFINE_SIDES, adaptive_loss, meanflow_target, pair_t_r
from mfsr_fast.metrics import local_texture
from mfsr_fast.model import MFSRTransformer
from training import checkpoint as ckpt
from training import engine
from training.trajectories import DRAW_SALT, Trajectories, weights_digest


@dataclass
class DistillConfig(engine.TrainConfig):
    output_dir: str = "runs/student"
    teacher: str = ""  # teacher run / checkpoint / save_pretrained / DiT4SR / SD3.5 folder (required)
    teacher_ema: bool = True  # from a training checkpoint, use its EMA weights
    prompts: str = ""  # prompt-embedding file (mfsr_fast.prompts) for teachers without stored prompts
    teacher_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | float32 | bfloat16
    norm_k_bug: str = "auto"  # DiT4SR/SD3.5 teachers: auto (on for DiT4SR weights, as released) | on | off
    lr_conv_scale: float = 0.0  # DiT4SR/SD3.5 teachers: weight of the LR conv (0: DESIGN's 1.2)
    guidance: float = 2.0  # w of the teacher's guided velocity (1: no guidance)
    against: str = "negative"  # the guidance's other prompt: negative or null
    # Guidance only where t > guidance_above (a guidance interval, Kynkaanniemi et al. 2024); the target is the
    # positive velocity alone below it. 0: everywhere. Matches the teacher sampled as teacher:N:cfgW:refineT:aboveT.
    guidance_above: float = 0.0
    equal_fraction: float = 0.5  # share of samples with r = t (plain velocity matching)
    data_mix: float = 0.0  # weight of the data velocity e - x mixed into the target
    jvp_mode: str = "auto"  # auto (= explicit) | explicit | jvp | split (torch.func.jvp; jvp not under DDP)
    jvp_fp32: bool = True  # the JVP pass outside bf16 autocast
    loss_p: float = 1.0  # adaptive weighting L / sg(L + c)^p
    loss_c: float = 1e-3
    # > 0: the multi-step sampling grid (MFSRConfig.refine_t) stored in the student's config from the start, so the
    # run's samples (--sample-every), checkpoints and exports use it; 0: the teacher's (export --refine-t overrides).
    refine_t: float = 0.0
    # > 0: the student gets this many more blocks than the teacher, inserted before its last one as copies of the
    # block before it with zero adaLN-Zero gates (MFSRTransformer.grown): it starts as exactly the teacher, with more
    # capacity to reproduce the teacher's samples (--trajectories). Its config records the depth it has.
    grow_layers: int = 0
    # "average" | "endpoint": the kind of multi-step jump (MFSRConfig.jump, meanflow.sample) stored in the student's
    # config from the start, as refine_t; "": the teacher's (export --jump overrides).
    jump: str = ""
    # "below" | "above": which side of refine_t the multi-step grid's equal steps lie on (MFSRConfig.refine_side,
    # meanflow.time_grid) stored in the student's config from the start, as refine_t; "": the teacher's (or the
    # --init student's; export --refine-side overrides).
    refine_side: str = ""
    # A folder of the teacher's many-step samples (python -m training.trajectories): each step adds a regression of
    # the student's one step from a stored noise onto the teacher's sample from it, weighted trajectory_weight,
    # over trajectory_batch pairs drawn from the folder (per rank).
    trajectories: str = ""
    trajectory_weight: float = 1.0
    trajectory_batch: int = 4
    # The stored samples' target blended with an anchor student's one step from the same noise:
    # x = mix x_T + (1 - mix) x_anchor (1: the teacher's samples alone). An output blend keeps the teacher's texture
    # where it is, at a lower amplitude (RESULTS.md: such blends of the default and the teacher's 40 steps).
    # The anchor: a student folder (run, checkpoint, save_pretrained) or "default", in the student's flow space, or
    # "teacher": the --teacher's own one Euler step from the noise (unguided, r = t = 1), its estimate of the posterior
    # mean, so the blend shrinks the sample's texture towards the teacher's fidelity rather than another model's.
    trajectory_anchor: str = ""
    trajectory_mix: float = 1.0
    # Share of the stored pairs trained as the jump 1 -> refine_t (the first of a "below" grid, the first of 2 steps on
    # an "above" one) onto the same straight
    # line (its velocity is e - x for every r), meant to start steps 2-4 from the one step's texture (on the
    # default's pair they still came out smoother: RESULTS.md); needs refine_t.
    trajectory_refine: float = 0.0
    # Share of the stored pairs trained at a point of the straight line from the noise e to the target x,
    # z = (1 - t) x + t e with t log-uniform in [LINE_T_MIN, 1] and r = 0 or uniform in [0, t): the velocity is e - x
    # for every such (r, t), so steps 2-4 (which start on the one step's line) are taught to land where the one step
    # did, not on the smoother estimate the student starts with at small t (0.25 with refine 0.25 on the default's
    # pair: 4 steps 0.22 NIQE closer to the one step in 300 steps, not all the way: RESULTS.md). refine + line <= 1;
    # the rest are one-step jumps.
    trajectory_line: float = 0.0
    # Window side in pixels (odd; 0: off) over which the stored targets' texture is capped at the HR crop's: where the
    # blended target carries more high-frequency energy (metrics.local_texture: the image minus its Gaussian blur,
    # per pixel, averaged over the window) than the HR crop its LR was made from, its difference from the anchor's one
    # step is scaled down to match. It takes out the mottle the teacher's samples put on what is flat in the photo
    # (sky, walls, skin, defocused backgrounds) and keeps their texture where the photo has as much. Needs
    # --trajectory-anchor, the pixel codec and the pool the samples were made from (--pool). Measured on the default's
    # fine-tune (window 17, RESULTS.md, 2026-12-04): it moves the student along the same SSIM-Y / NIQE line as a
    # lower --trajectory-mix (SSIM-Y +0.0018, NIQE +0.08, texture on DRealSR's flat quarter -2%), so the recipe
    # leaves it out: the mottle comes with this teacher's texture, not from the crops where the photo is flat.
    trajectory_texture_cap: int = 0
    # A student folder (run, checkpoint, save_pretrained) or "default" whose weights the student starts from instead
    # of the teacher's: fine-tune an existing student (towards --trajectories, say) rather than distil from scratch.
    # Its architecture and flow must be the teacher's; its sampling grid (refine_t, jump, refine_side) is kept unless
    # --refine-t / --jump / --refine-side set one.
    init: str = ""


PRESETS = {
    # The embedded default's student: about 15 minutes on 2 CPU cores. Guidance 1.0: on DRealSR (first 10) guidance
    # 1.5 gave 28.63 dB / NIQE 5.00 at one step, 1.0 gave 29.33 dB / NIQE 6.95; only the latter meets both quality
    # targets against bicubic (29.77 dB / 11.69), since this small teacher's guided field mostly adds grain.
    "tiny": dict(model_preset="tiny", max_steps=200, batch_size=32, crop=64, lr=1e-4, warmup_steps=20,
                 ema_decay=0.99, ckpt_every=100, num_workers=1, t_mean=0.4, t_one_fraction=0.2, guidance=1.0),
    # The restorer-conditioned default's student (DESIGN section 8), from the tiny-r teacher, on the same pool:
    # 14.5 minutes on 2 CPU cores. Guidance 1.5 against the negative prompt: on DRealSR (first 20 pairs) the teacher's
    # one guided step had NIQE 6.85 against 7.38 unguided at the same PSNR-Y (30.32 / 30.30 dB) and SSIM-Y 0.849 /
    # 0.857; the student's one step matches it (30.33 dB, 0.848, 6.82), at 150 steps as at 300.
    "tiny-r": dict(model_preset="tiny-r", max_steps=300, batch_size=16, crop=128, degradation="mild", lr=1e-4,
                   warmup_steps=20, ema_decay=0.99, ckpt_every=100, num_workers=1, t_mean=0.0, t_one_fraction=0.3,
                   guidance=1.5, refine_t=0.06),
    "small": dict(model_preset="small", max_steps=10000, batch_size=32, crop=256, lr=5e-5),
    "micro": dict(model_preset="tiny", max_steps=6, batch_size=4, crop=32, warmup_steps=1, ckpt_every=2, log_every=1,
                  num_workers=0),
    # MFSR's recipe on a DiT4SR teacher (SD3.5-medium size): 512 px crops in SD3 VAE latents, CFG 8.0 against the
    # negative prompt, bf16 autocast with the JVP in fp32, FSDP2 across the GPUs (torchrun).
    "dit4sr": dict(model_preset="dit4sr", max_steps=20000, batch_size=16, crop=512, lr=1e-5, warmup_steps=500,
                   ema_decay=0.999, ckpt_every=500, num_workers=4, guidance=8.0, against="negative",
                   equal_fraction=0.5, t_one_fraction=0.1, fsdp=True),
}


def resolve_teacher(path: str, use_ema: bool = True, prompts: str = "", norm_k_bug: str = "auto",
                    lr_conv_scale: float = 0.0) -> MFSRTransformer:
    """Load a teacher from a run folder, a checkpoint folder, a save_pretrained folder or a DiT4SR / SD3.5 folder;
    ``prompts`` (a prompt file) gives it prompt embeddings, frozen."""
    if not path:
        raise SystemExit("--teacher is required: a teacher run folder (python -m training.teacher --output-dir ...), "
                         "one of its checkpoints, a save_pretrained MFSRTransformer folder, or a DiT4SR-format "
                         "transformer folder")
    if not os.path.isdir(path):
        raise SystemExit(f"--teacher {path}: no such folder")
    run_ckpt = ckpt.latest_checkpoint(os.path.join(path, "checkpoints"),
                                      report=lambda m: print(f"--teacher: {m}", file=sys.stderr, flush=True))
    if run_ckpt is not None:
        path = run_ckpt
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        sub = "ema" if use_ema and os.path.isdir(os.path.join(path, "ema")) else "model"
        path = os.path.join(path, sub)
    if norm_k_bug not in ("auto", "on", "off"):
        raise SystemExit(f"--norm-k-bug must be auto, on or off, got {norm_k_bug!r}")
    try:
        teacher, report = load_teacher(path, prompts=prompts or None, lr_conv_scale=lr_conv_scale or None,
                                       dit4sr_norm_k_bug={"auto": None, "on": True, "off": False}[norm_k_bug])
    except ValueError as e:
        raise SystemExit(f"--teacher: {e}") from None
    if report.format == "mfsr" and (norm_k_bug != "auto" or lr_conv_scale):
        raise SystemExit("--norm-k-bug / --lr-conv-scale apply to DiT4SR / SD3.5 folders; this teacher is an "
                         "MFSRTransformer that already records both in its config")
    if report.format != "mfsr":
        print(report, flush=True)
    return teacher


def load_trajectories(cfg: DistillConfig, student: MFSRTransformer, teacher_digest: str | None = None):
    """``--trajectories`` checked against the run (the flow's channels, the crop; a notice when its samples come from
    other teacher weights than ``teacher_digest``, by default that of ``student`` as the teacher's untrained copy:
    pass the teacher's digest when --init replaced the student's weights), with the HR crops of ``--pool`` attached
    for ``--trajectory-texture-cap``; None when not given."""
    if cfg.trajectory_texture_cap:
        if cfg.trajectory_texture_cap < 0 or cfg.trajectory_texture_cap % 2 == 0:
            raise SystemExit(f"--trajectory-texture-cap is a window side in pixels: odd and > 0 (0: off), got "
                             f"{cfg.trajectory_texture_cap}")
        if not (cfg.trajectories and cfg.trajectory_anchor):
            raise SystemExit("--trajectory-texture-cap scales the stored samples' difference from the anchor's one "
                             "step: it needs --trajectories and --trajectory-anchor")
        if student.cfg.codec != "pixel4":
            raise SystemExit("--trajectory-texture-cap measures texture in pixels: it needs the pixel codec, this "
                             f"model's is {student.cfg.codec!r}")
        if not cfg.pool:
            raise SystemExit("--trajectory-texture-cap compares with the HR crops of the pool the samples were made "
                             "from: pass it as --pool")
    if not cfg.trajectories:
        return None
    if cfg.trajectory_batch < 1 or not cfg.trajectory_weight > 0:
        raise SystemExit("--trajectory-batch must be >= 1 and --trajectory-weight > 0 with --trajectories")
    try:
        traj = Trajectories(cfg.trajectories)
    except ValueError as e:
        raise SystemExit(f"--trajectories: {e}") from None
    if not student.needs_restorer:
        raise SystemExit("--trajectories: the samples are conditioned on R(LR); this model's LR stream is not")
    channels, side = traj.tensors["noise"].shape[1], traj.tensors["restored"].shape[-1]
    if channels != student.cfg.in_channels or side != cfg.crop:
        raise SystemExit(f"--trajectories {cfg.trajectories}: {channels}-channel samples of {side} px crops; this "
                         f"run trains a {student.cfg.in_channels}-channel model on {cfg.crop} px crops")
    # The teacher's weights say which teacher this run distils (folders built before the builder recorded the
    # weights: their teacher's path).
    digest = traj.meta.get("teacher_weights")
    if digest:
        other = digest != (teacher_digest if teacher_digest is not None else weights_digest(student))
    else:
        other = os.path.abspath(traj.meta["teacher"]) != os.path.abspath(cfg.teacher)
    if other:
        print(f"--trajectories: its samples come from another teacher ({traj.meta['teacher']}) than --teacher "
              f"{cfg.teacher}", file=sys.stderr, flush=True)
    if cfg.trajectory_texture_cap:
        from training.pool import Pool
        try:
            traj.attach_hr(Pool(cfg.pool))
        except ValueError as e:
            raise SystemExit(f"--trajectory-texture-cap: --pool {cfg.pool} is not the pool of --trajectories "
                             f"{cfg.trajectories}: {e}") from None
    return traj


def texture_cap_scale(target: torch.Tensor, hr: torch.Tensor, window: int, eps: float = 1e-10) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: sqrt(local_texture(hr) / local_texture(target)), at most 1. Where the target image is
    busier than the photo, the factor that brings its texture to the photo's amplitude."""
    return (local_texture(hr, window) / local_texture(target, window).clamp_min(eps)).sqrt().clamp(max=1)


def cap_texture(x2: torch.Tensor, x_a: torch.Tensor, hr: torch.Tensor, model: MFSRTransformer, codec, c2,
                window: int) -> torch.Tensor:
    """The stored targets ``x2`` (flow space) with their difference from the anchor's ``x_a`` scaled per pixel by
    ``texture_cap_scale`` of their decoded image against ``hr``. Pixel codec only: the flow is then the pixel image
    rearranged (``PixelCodec``: space-to-depth of 2 img - 1), so a per-pixel factor is its encoding."""
    img = codec.decode(model.from_flow(x2, c2))
    s = texture_cap_scale(img, hr, window)
    s_flow = (codec.encode(s.expand(-1, img.shape[1], -1, -1)) + 1) / 2  # each pixel's factor at its channels
    return x_a + s_flow * (x2 - x_a)


# What makes two models' flows the same space: an anchor must agree with the student on all of these.
FLOW_FIELDS = ("codec", "in_channels", "prediction", "lr_stream", "lr_source", "residual_scale", "restorer")


LINE_T_MIN = 0.01  # the smallest t of --trajectory-line's points (a 4-step grid at refine_t 0.06 ends at 0.02)


ANCHOR_TEACHER = "teacher"  # --trajectory-anchor's name for the --teacher's own one step


def load_anchor(cfg: DistillConfig, student: MFSRTransformer, device,
                teacher: MFSRTransformer | None = None) -> MFSRTransformer | None:
    """``--trajectory-anchor`` loaded (frozen) and checked against the student's flow space; None without a blend.
    "teacher" gives ``teacher`` itself (the student's flow by construction)."""
    if not 0.0 <= cfg.trajectory_mix <= 1.0:
        raise SystemExit(f"--trajectory-mix must be in [0, 1], got {cfg.trajectory_mix}")
    if not 0.0 <= cfg.trajectory_refine <= 1.0:
        raise SystemExit(f"--trajectory-refine must be in [0, 1], got {cfg.trajectory_refine}")
    if not 0.0 <= cfg.trajectory_line <= 1.0:
        raise SystemExit(f"--trajectory-line must be in [0, 1], got {cfg.trajectory_line}")
    if cfg.trajectory_refine + cfg.trajectory_line > 1:
        raise SystemExit(f"--trajectory-refine {cfg.trajectory_refine} and --trajectory-line {cfg.trajectory_line} "
                         "are shares of the same stored pairs: their sum must be <= 1")
    if cfg.trajectory_refine > 0 and not cfg.refine_t > 0:
        raise SystemExit("--trajectory-refine trains the multi-step grid's first jump (1 -> refine_t): it needs "
                         "--refine-t > 0")
    if (cfg.trajectory_anchor or cfg.trajectory_mix < 1 or cfg.trajectory_refine > 0 or cfg.trajectory_line > 0) \
            and not cfg.trajectories:
        raise SystemExit("--trajectory-anchor, --trajectory-mix, --trajectory-refine and --trajectory-line need "
                         "--trajectories")
    if cfg.trajectory_mix < 1 and not cfg.trajectory_anchor:
        raise SystemExit("--trajectory-mix < 1 blends the stored samples with an anchor's one step: give "
                         "--trajectory-anchor (a student folder, 'default' or 'teacher')")
    if not cfg.trajectory_anchor:
        return None
    if cfg.trajectory_mix == 1:
        raise SystemExit("--trajectory-anchor is blended in with --trajectory-mix < 1 (1: the teacher's samples alone)")
    if cfg.trajectory_anchor == ANCHOR_TEACHER:
        if teacher is None:
            raise ValueError("load_anchor: --trajectory-anchor teacher needs the teacher passed in")
        return teacher
    from mfsr_fast.loading import load_model
    try:
        anchor = load_model(cfg.trajectory_anchor, device=device, dtype=torch.float32)
    except ValueError as e:
        raise SystemExit(f"--trajectory-anchor: {e}") from None
    differ = _differences(anchor, student, FLOW_FIELDS, "")
    if differ:
        raise SystemExit(f"--trajectory-anchor {cfg.trajectory_anchor}: its flow is not the student's ({differ})")
    return anchor


# Config fields that only choose how a model is sampled: an --init student may differ from its teacher in them.
SAMPLING_FIELDS = ("refine_t", "jump", "refine_side", "flat_detail")


def load_init(cfg: DistillConfig, student: MFSRTransformer) -> str:
    """``--init``: the student's weights (and sampling grid) replaced by an existing student's, in place, after checking
    that it is the teacher's architecture and flow. Returns its weights' digest ("" without --init)."""
    if not cfg.init:
        return ""
    from mfsr_fast.loading import load_model
    try:
        init = load_model(cfg.init, device="cpu", dtype=torch.float32)
    except ValueError as e:
        raise SystemExit(f"--init: {e}") from None
    fields = [f.name for f in dataclasses.fields(student.cfg) if f.name not in SAMPLING_FIELDS]
    differ = _differences(init, student, fields, "the teacher's ")
    if differ:
        raise SystemExit(f"--init {cfg.init}: not the teacher's architecture and flow ({differ})")
    student.load_state_dict(init.state_dict())
    set_config(student, **{f: getattr(init.cfg, f) for f in SAMPLING_FIELDS})
    return weights_digest(init)


def _differences(model: MFSRTransformer, ref: MFSRTransformer, fields, whose: str) -> str:
    """The config fields in which ``model`` differs from ``ref``, for an error message ("" where none)."""
    return ", ".join(f"{f} {getattr(model.cfg, f)!r} against {whose}{getattr(ref.cfg, f)!r}" for f in fields
                     if getattr(model.cfg, f) != getattr(ref.cfg, f))


def set_config(model: MFSRTransformer, **fields) -> None:
    """Config fields changed on a built model: in its saved config and in ``model.cfg`` alike."""
    model.register_to_config(**fields)
    model.cfg = dataclasses.replace(model.cfg, **fields)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.detach().float() - b.detach().float()).pow(2).mean()


def make_loss(cfg: DistillConfig, teacher: MFSRTransformer, codec, traj=None, anchor=None):
    how = TeacherSampling(cfg.guidance, cfg.against, interval=(cfg.guidance_above, 1.0))

    def loss_fn(field, model: MFSRTransformer, batch, step: int, d) -> tuple[torch.Tensor, dict]:
        """-> (the adaptive loss, its raw parts for the log: the mean squared error per element of the MeanFlow
        rows, ``mse``, and of the stored pairs, ``mse_traj``; the adaptive loss itself sits near 1 per term)."""
        hr, lr, restored, seeds = batch
        gens = engine.per_sample_generators(seeds)
        c = lr_condition(model, codec, lr, restored)  # as at inference
        x = model.to_flow(codec.encode(hr), c)  # the flow's space: x, or the scaled residual over R(LR)
        e = engine.per_sample_randn(gens, tuple(x.shape[1:])).to(x.device)
        a = engine.sample_t(gens, cfg)
        b = engine.logit_normal(gens, cfg.t_mean, cfg.t_std)
        equal = engine.per_sample_rand(gens) < cfg.equal_fraction
        # Half of the t = 1 draws train the one-step jump (r = 0); the rest keep r from the second draw, so the first
        # jump of a multi-step schedule (t = 1 to r > 0) is trained too.
        one_step = (a == 1) & ~equal & (engine.per_sample_rand(gens) < 0.5)
        t, r = pair_t_r(a, b, equal, one_step)
        t, r = t.to(x.device), r.to(x.device)
        tb = t.view(-1, 1, 1, 1)
        z = (1 - tb) * x + tb * e
        tdt = teacher.pos_embed.weight.dtype
        v_t = guided_velocity(teacher, z.to(tdt), c.to(tdt), t, how.weights(t), cfg.against).float()
        if cfg.data_mix > 0:
            v_t = (1 - cfg.data_mix) * v_t + cfg.data_mix * (e - x)
        B = x.shape[0]
        if traj is not None:  # the stored pairs ride in the same (DDP-synchronised) pass, as one-step jumps
            g = torch.Generator().manual_seed(engine.sample_seed(cfg.seed ^ DRAW_SALT, step, d.rank))
            idx2 = torch.randint(len(traj), (cfg.trajectory_batch,), generator=g)
            e2, x2, lr2, restored2 = (v.to(x.device) for v in traj.take(idx2))
            c2 = lr_condition(model, codec, lr2, restored2)
            n = len(e2)
            one, r2 = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
            if anchor is not None:  # the anchor's one step, blended in (load_anchor: only with mix < 1)
                with torch.no_grad():
                    if anchor is teacher:  # one Euler step of the velocity field: r = t
                        x_a = e2 - teacher.field(e2.to(tdt), c2.to(tdt), one, one, prompt="positive").float()
                    else:
                        x_a = e2 - anchor.field(e2, c2, one, r2, prompt="positive").float()
                x2 = cfg.trajectory_mix * x2 + (1 - cfg.trajectory_mix) * x_a
                if cfg.trajectory_texture_cap:
                    x2 = cap_texture(x2, x_a, traj.hr(idx2).to(x.device), model, codec, c2,
                                     cfg.trajectory_texture_cap)
            t2 = one
            if cfg.trajectory_refine > 0 or cfg.trajectory_line > 0:  # on the same line: velocity e - x again
                kind = torch.rand(n, generator=g)
                first = (kind < cfg.trajectory_refine).to(x.device)  # the first jump 1 -> refine_t
                r2 = torch.where(first, torch.full_like(r2, cfg.refine_t), r2)
                if cfg.trajectory_line > 0:  # a point of the line and a jump from it
                    line = ((kind >= cfg.trajectory_refine) & (kind < cfg.trajectory_refine + cfg.trajectory_line))
                    tl = LINE_T_MIN ** torch.rand(n, generator=g)
                    rl = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, tl * torch.rand(n, generator=g))
                    line = line.to(x.device)
                    t2 = torch.where(line, tl.to(x.device), t2)
                    r2 = torch.where(line, rl.to(x.device), r2)
            tb2 = t2.view(-1, 1, 1, 1)
            c = torch.cat([c, c2])
            z = torch.cat([z, (1 - tb2) * x2 + tb2 * e2])  # e2 itself at t = 1
            v_t = torch.cat([v_t, e2 - x2])  # the one step's velocity to the teacher's sample
            t = torch.cat([t, t2])
            r = torch.cat([r, r2])
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


def main(argv: list[str] | None = None) -> int:
    cfg = engine.parse_config(DistillConfig, PRESETS, argv, "Distil a MeanFlow one-step student (DESIGN section 3).")
    if cfg.jvp_mode not in ("auto", "explicit", "jvp", "split"):
        raise SystemExit(f"--jvp-mode must be auto, explicit, jvp or split, got {cfg.jvp_mode!r}")
    if cfg.against not in ("negative", "null"):
        raise SystemExit(f"--against must be negative or null, got {cfg.against!r}")
    if not 0.0 <= cfg.guidance_above < 1.0:
        raise SystemExit(f"--guidance-above must be in [0, 1), got {cfg.guidance_above}")
    if cfg.jvp_mode == "jvp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--jvp-mode jvp cannot run under DDP (torch.func.jvp cannot take the wrapper): use split")
    if not 0.0 <= cfg.refine_t < 1.0:
        raise SystemExit(f"--refine-t must be in [0, 1), got {cfg.refine_t}")
    if cfg.grow_layers < 0:
        raise SystemExit(f"--grow-layers must be >= 0, got {cfg.grow_layers}")
    if cfg.jump not in ("", *JUMPS):
        raise SystemExit(f"--jump must be one of {', '.join(JUMPS)}, got {cfg.jump!r}")
    if cfg.refine_side not in ("", *REFINE_SIDES):
        raise SystemExit(f"--refine-side must be one of {', '.join(REFINE_SIDES)}, got {cfg.refine_side!r}")
    if cfg.teacher_dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--teacher-dtype must be auto, float32 or bfloat16, got {cfg.teacher_dtype!r}")
    teacher = resolve_teacher(cfg.teacher, cfg.teacher_ema, cfg.prompts, cfg.norm_k_bug, cfg.lr_conv_scale)
    frozen_prompts = bool(cfg.prompts)
    student = copy.deepcopy(teacher).float().requires_grad_(True)  # fp32 master weights
    teacher_digest = weights_digest(student) if cfg.trajectories else ""  # the teacher's, before --init replaces them
    init = load_init(cfg, student)
    if cfg.grow_layers:
        student = student.grown(cfg.grow_layers)
    if cfg.refine_t > 0:  # sampling only: the training target does not use it
        set_config(student, refine_t=cfg.refine_t)
    if cfg.jump:
        set_config(student, jump=cfg.jump)
    if cfg.refine_side:
        set_config(student, refine_side=cfg.refine_side)
    if frozen_prompts:  # embeddings of a text encoder: conditioning, not weights to learn
        student.prompt_context.requires_grad_(False)
        if student.prompt_pooled is not None:
            student.prompt_pooled.requires_grad_(False)
    teacher.requires_grad_(False).eval()
    device = engine.training_device(cfg.device)
    tdt = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
           "bfloat16": torch.bfloat16}[cfg.teacher_dtype]
    teacher.to(device=device, dtype=tdt)
    codec = engine.codec_for(student, cfg.vae)
    traj = load_trajectories(cfg, student, teacher_digest)
    anchor = load_anchor(cfg, student, device, teacher)
    engine.train(cfg, student, make_loss(cfg, teacher, codec, traj, anchor), name="distill",
                 extra={"teacher": os.path.abspath(cfg.teacher), "guidance": cfg.guidance,
                        "guidance_above": cfg.guidance_above,
                        "trajectories": traj.meta if traj is not None else None,
                        "trajectory_anchor": (os.path.abspath(cfg.trajectory_anchor) if cfg.trajectory_anchor not in
                                              ("", "default", ANCHOR_TEACHER) else cfg.trajectory_anchor),
                        "trajectory_anchor_weights": weights_digest(anchor) if anchor is not None else "",
                        "init": (os.path.abspath(cfg.init) if cfg.init not in ("", "default") else cfg.init),
                        "init_weights": init,
                        "vae": os.path.abspath(cfg.vae) if cfg.vae else ""}, student=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
