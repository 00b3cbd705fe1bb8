"""Distil a teacher into a one-step MeanFlow student: ``python -m training.distill --teacher DIR --data DIR``.

The student (teacher architecture + the h = t - r embedder; ``--grow-layers N``: N more blocks, which start as the
identity) starts as a copy of the teacher and learns the average velocity u(z_t, r, t) by the MeanFlow identity,
with the teacher's guided velocity as both the target velocity and the JVP tangent (DESIGN section 3; the loss:
``training.distill_loss``). ``--trajectories DIR`` (``training.trajectories``) adds pairs (e, x_T) of a noise and
the teacher's many-step sample from it, trained as one-step jumps (t = 1, r = 0) with the target u = e - x_T, in the
same pass as the batch; ``--trajectory-anchor MODEL --trajectory-mix M`` blends x_T with a frozen student's (or the
teacher's) one step from e (M x_T + (1 - M) x_A), ``--trajectory-refine S`` trains a share S of them as the jump
1 -> refine_t (a multi-step grid's first) and ``--trajectory-line S`` a share S at points of the straight line from e
to x_T (steps 2-4's jumps). ``--refine-t``, ``--jump`` and ``--refine-side`` set the student's sampler
(``SamplerConfig``, stored in every checkpoint beside the weights). The student keeps the teacher's learned prompts and
is conditioned on ``positive`` alone, so inference needs no text encoder and no guidance pass.

``--teacher`` takes a training run folder (its newest checkpoint), a checkpoint folder (its EMA weights unless
``--no-teacher-ema``), a ``save_pretrained`` folder of an MFSRTransformer, or a DiT4SR-format / SD3.5 transformer
folder (``mfsr_fast.models.convert.load_transformer``). A teacher without stored prompts (DiT4SR, SD3.5) needs
``--prompts``, a prompt-embedding file (``python -m mfsr_fast.models.prompts``); these embeddings are stored, frozen,
in the student. Models in SD3 VAE latent space need ``--vae``. The ``dit4sr`` preset is the real recipe (guidance 8.0
against the negative prompt, bf16 autocast, FSDP2 over the GPUs under torchrun): docs/training.md.
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

from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.sampling.config import SamplerConfig
from mfsr_fast.sampling.meanflow import JUMPS, REFINE_SIDES
from training import components
from training.config import TrainConfig, parse_config
from training.distill_loss import make_loss
from training.distributed import training_device
from training.loop import train
from training.trajectories import Trajectories


@dataclass
class DistillConfig(TrainConfig):
    output_dir: str = "runs/student"
    teacher: str = ""  # teacher run / checkpoint / save_pretrained / DiT4SR / SD3.5 folder (required)
    teacher_ema: bool = True  # from a training checkpoint, use its EMA weights
    prompts: str = ""  # prompt-embedding file (mfsr_fast.models.prompts) for teachers without stored prompts
    teacher_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | float32 | bfloat16
    norm_k_bug: str = "auto"  # DiT4SR/SD3.5 teachers: auto (on for DiT4SR weights, as released) | on | off
    lr_conv_scale: float = 0.0  # DiT4SR/SD3.5 teachers: weight of the LR conv (0: DESIGN's 1.2)
    guidance: float = 2.0  # w of the teacher's guided velocity (1: no guidance)
    against: str = "negative"  # the guidance's other prompt: negative or null
    # Guidance only where t > guidance_above (a guidance interval, Kynkaanniemi et al. 2024); the target is the
    # positive velocity alone below it. 0: everywhere. Matches the teacher sampled as teacher:N:cfgW:refineT:aboveT.
    guidance_above: float = 0.0
    equal_fraction: float = 0.5  # share of samples with r = t (plain velocity matching)
    jvp_mode: str = "auto"  # auto (= explicit) | explicit | jvp | split (torch.func.jvp; jvp not under DDP)
    jvp_fp32: bool = True  # the JVP pass outside bf16 autocast
    loss_p: float = 1.0  # adaptive weighting L / sg(L + c)^p
    loss_c: float = 1e-3
    # The student's sampler (SamplerConfig), stored beside its weights in every checkpoint, so the run's samples
    # (--sample-every) and exports use it: refine_t > 0 its grid's turning point, jump "average" | "endpoint",
    # refine_side "below" | "above"; 0 / "": the teacher's folder's (or the --init student's). export overrides them.
    refine_t: float = 0.0
    jump: str = ""
    refine_side: str = ""
    # > 0: the student gets this many more blocks than the teacher, inserted before its last one as copies of the
    # block before it with zero adaLN-Zero gates (MFSRTransformer.grown): it starts as exactly the teacher, with more
    # capacity to reproduce the teacher's samples (--trajectories). Its config records the depth it has.
    grow_layers: int = 0
    # A folder of the teacher's many-step samples (python -m training.trajectories): each step adds a regression of
    # the student's one step from a stored noise onto the teacher's sample from it, weighted trajectory_weight,
    # over trajectory_batch pairs drawn from the folder (per rank).
    trajectories: str = ""
    trajectory_weight: float = 1.0
    trajectory_batch: int = 4
    # The stored samples' target blended with an anchor's one step from the same noise:
    # x = mix x_T + (1 - mix) x_anchor (1: the teacher's samples alone). An output blend keeps the teacher's texture
    # where it is, at a lower amplitude. The anchor: a student folder (run, checkpoint, save_pretrained) or "default",
    # in the student's flow space, or "teacher": the --teacher's own one Euler step from the noise (unguided,
    # r = t = 1), its estimate of the posterior mean, so the blend shrinks the sample's texture towards the
    # teacher's fidelity rather than another model's.
    trajectory_anchor: str = ""
    trajectory_mix: float = 1.0
    # Share of the stored pairs trained as the jump 1 -> refine_t (the first of a "below" grid, the first of 2 steps
    # on an "above" one) onto the same straight line (its velocity is e - x for every r); needs refine_t.
    trajectory_refine: float = 0.0
    # Share of the stored pairs trained at a point of the straight line from the noise e to the target x,
    # z = (1 - t) x + t e with t log-uniform in [LINE_T_MIN, 1] and r = 0 or uniform in [0, t): the velocity is e - x
    # for every such (r, t), so steps 2-4 (which start on the one step's line) are taught to land where the one step
    # did. refine + line <= 1; the rest are one-step jumps.
    trajectory_line: float = 0.0
    # A student folder (run, checkpoint, save_pretrained) or "default" whose weights the student starts from instead
    # of the teacher's: fine-tune an existing student (towards --trajectories, say) rather than distil from scratch.
    # Its architecture and flow must be the teacher's; its sampler is kept unless --refine-t / --jump / --refine-side
    # set one.
    init: str = ""


PRESETS = {
    # The first tiny students' recipe (bicubic LR stream): unguided, since this small teacher's guided field mostly
    # adds grain.
    "tiny": dict(model_preset="tiny", max_steps=200, batch_size=32, crop=64, lr=1e-4, warmup_steps=20,
                 ema_decay=0.99, ckpt_every=100, num_workers=1, t_mean=0.4, t_one_fraction=0.2, guidance=1.0),
    # The restorer-conditioned default's first student (DESIGN section 8), from the tiny-r teacher, on the same pool,
    # guided 1.5 against the negative prompt (docs/results/how-the-default-was-made.md).
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


def check_config(cfg: DistillConfig) -> None:
    """Every setting that can be wrong on its own, as one line, before any model loads."""
    for name, value, choices in (("jvp-mode", cfg.jvp_mode, ("auto", "explicit", "jvp", "split")),
                                 ("against", cfg.against, ("negative", "null")),
                                 ("jump", cfg.jump, ("", *JUMPS)),
                                 ("refine-side", cfg.refine_side, ("", *REFINE_SIDES)),
                                 ("teacher-dtype", cfg.teacher_dtype, ("auto", "float32", "bfloat16"))):
        if value not in choices:
            raise SystemExit(f"--{name} must be one of {', '.join(c for c in choices if c)}, got {value!r}")
    if not 0.0 <= cfg.guidance_above < 1.0:
        raise SystemExit(f"--guidance-above must be in [0, 1), got {cfg.guidance_above}")
    if cfg.jvp_mode == "jvp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--jvp-mode jvp cannot run under DDP (torch.func.jvp cannot take the wrapper): use split")
    if not 0.0 <= cfg.refine_t < 1.0:
        raise SystemExit(f"--refine-t must be in [0, 1), got {cfg.refine_t}")
    if cfg.grow_layers < 0:
        raise SystemExit(f"--grow-layers must be >= 0, got {cfg.grow_layers}")
    check_trajectory_options(cfg)


def check_trajectory_options(cfg: DistillConfig) -> None:
    """The --trajectory-* settings: shares in [0, 1], and only with what they need."""
    for name in ("trajectory_mix", "trajectory_refine", "trajectory_line"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
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
    if cfg.trajectory_anchor and cfg.trajectory_mix == 1:
        raise SystemExit("--trajectory-anchor is blended in with --trajectory-mix < 1 (1: the teacher's samples alone)")
    if cfg.trajectories and (cfg.trajectory_batch < 1 or not cfg.trajectory_weight > 0):
        raise SystemExit("--trajectory-batch must be >= 1 and --trajectory-weight > 0 with --trajectories")


def load_trajectories(cfg: DistillConfig, student: MFSRTransformer, teacher_digest: str | None = None):
    """``--trajectories`` checked against the run (the flow's channels, the crop; a notice when its samples come from
    other teacher weights than ``teacher_digest``, by default that of ``student`` as the teacher's untrained copy:
    pass the teacher's digest when --init replaced the student's weights); None when not given."""
    if not cfg.trajectories:
        return None
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
        other = digest != (teacher_digest if teacher_digest is not None else components.weights_digest(student))
    else:
        other = os.path.abspath(traj.meta["teacher"]) != os.path.abspath(cfg.teacher)
    if other:
        print(f"--trajectories: its samples come from another teacher ({traj.meta['teacher']}) than --teacher "
              f"{cfg.teacher}", file=sys.stderr, flush=True)
    return traj


def build_student(cfg: DistillConfig, teacher: MFSRTransformer, teacher_folder: str
                  ) -> tuple[MFSRTransformer, SamplerConfig, str, str]:
    """(the student: the teacher's copy in fp32, or the --init student's weights, grown by --grow-layers; its
    sampler; the --init weights' digest or ""; the teacher's digest when --trajectories needs it, else "")."""
    student = copy.deepcopy(teacher).float().requires_grad_(True)  # fp32 master weights
    teacher_digest = components.weights_digest(student) if cfg.trajectories else ""  # before --init replaces them
    init, sampler = "", components.teacher_sampler(teacher_folder)
    if cfg.init:
        init, sampler = components.load_init(cfg.init, student)
    if cfg.grow_layers:
        student = student.grown(cfg.grow_layers)
    given = {k: v for k, v in (("refine_t", cfg.refine_t), ("jump", cfg.jump), ("refine_side", cfg.refine_side)) if v}
    sampler = dataclasses.replace(sampler, **given)  # sampling only: the training target does not use it
    if cfg.prompts:  # embeddings of a text encoder: conditioning, not weights to learn
        student.prompt_context.requires_grad_(False)
        if student.prompt_pooled is not None:
            student.prompt_pooled.requires_grad_(False)
    return student, sampler, init, teacher_digest


def _provenance(cfg: DistillConfig, traj, anchor, init: str) -> dict:
    """What every checkpoint records beside the weights: the teacher, the stored samples, the anchor and init."""
    return {"teacher": os.path.abspath(cfg.teacher), "guidance": cfg.guidance, "guidance_above": cfg.guidance_above,
            "trajectories": traj.meta if traj is not None else None,
            "trajectory_anchor": (os.path.abspath(cfg.trajectory_anchor) if cfg.trajectory_anchor not in
                                  ("", "default", components.ANCHOR_TEACHER) else cfg.trajectory_anchor),
            "trajectory_anchor_weights": components.weights_digest(anchor) if anchor is not None else "",
            "init": (os.path.abspath(cfg.init) if cfg.init not in ("", "default") else cfg.init),
            "init_weights": init, "vae": os.path.abspath(cfg.vae) if cfg.vae else ""}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DistillConfig, PRESETS, argv, "Distil a MeanFlow one-step student (DESIGN section 3).")
    check_config(cfg)
    teacher, folder = components.resolve_teacher(cfg.teacher, cfg.teacher_ema, cfg.prompts, cfg.norm_k_bug,
                                                 cfg.lr_conv_scale)
    student, sampler, init, teacher_digest = build_student(cfg, teacher, folder)
    device = training_device(cfg.device)
    tdt = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
           "bfloat16": torch.bfloat16}[cfg.teacher_dtype]
    teacher.to(device=device, dtype=tdt)
    codec = components.codec_for(student, cfg.vae)
    traj = load_trajectories(cfg, student, teacher_digest)
    anchor = (components.load_anchor(cfg.trajectory_anchor, student, device, teacher) if cfg.trajectory_anchor
              else None)
    train(cfg, student, make_loss(cfg, teacher, codec, traj, anchor), name="distill",
          extra=_provenance(cfg, traj, anchor, init), sampler=sampler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
