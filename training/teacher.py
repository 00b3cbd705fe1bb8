"""Train a flow-matching super-resolution teacher: ``python -m training.teacher --preset tiny --data DIR``.

The teacher sees the noisy HR image z_t = (1 - t) x + t e in one stream and the bicubic-upsampled LR image (or the
restorer's output R(LR), DESIGN section 8) in the LR stream, and learns the velocity v = e - x (DESIGN section 2;
with ``prediction='x'`` the network predicts x and the velocity is derived, DESIGN section 4b). A residual model
(``residual_scale`` > 0) runs the same flow over y = (x - R(LR)) / residual_scale. Without a text encoder, its
context is one of three learned prompts:
- ``positive``: target the clean HR image;
- ``negative``: target the LR stream's base image (the upsampled LR, or R(LR)), so that guidance away from it adds
  what the base lacks, as DiT4SR's negative prompt does;
- ``null``: the unconditional prompt (prompt dropout), target the clean HR image.
``sample_teacher`` runs it for N Euler steps with classifier-free guidance against the negative (or null) prompt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from mfsr_fast.models.conditioning import lr_condition
from mfsr_fast.models.transformer import PROMPT_NAMES, MFSRTransformer
from training import batches
from training.components import codec_for
from training.config import TrainConfig, parse_config
from training.loop import train


@dataclass
class TeacherConfig(TrainConfig):
    output_dir: str = "runs/teacher"
    p_negative: float = 0.15  # share of samples trained on the negative prompt
    p_null: float = 0.1  # share trained on the null prompt
    # "v": squared velocity error (= the clean-image error weighted by 1 / t^2 for x predictions); "x": the clean-image
    # error with the same weight at every t (x predictions only), so the high-noise end, where one-step sampling
    # starts, is not drowned by the near-clean end.
    loss_space: str = "v"


PRESETS = {
    # The first tiny models' teacher (bicubic LR stream).
    "tiny": dict(model_preset="tiny", max_steps=600, batch_size=32, crop=64, lr=4e-4, warmup_steps=50,
                 ema_decay=0.995, ckpt_every=100, num_workers=1, t_mean=0.4, t_one_fraction=0.1),
    # The restorer-conditioned default's teacher (DESIGN section 8): the tiny transformer over Real-ESRGAN x4plus,
    # flow over the scaled residual HR - R(LR), 128 px crops (the upscaling tile) from a precomputed sample pool
    # (python -m training.pool; pass --pool, or leave it out to run R on the training device).
    "tiny-r": dict(model_preset="tiny-r", max_steps=2000, batch_size=16, crop=128, degradation="mild", lr=4e-4,
                   warmup_steps=50, ema_decay=0.995, ckpt_every=100, num_workers=1, t_mean=0.0,
                   t_one_fraction=0.2, loss_space="x"),
    "small": dict(model_preset="small", max_steps=20000, batch_size=32, crop=256, lr=2e-4),
    # A few steps of a 1-block model on 32 px crops: for tests.
    "micro": dict(model_preset="tiny", model_overrides={"num_layers": 1, "dual_attention_layers": [0],
                                                          "num_heads": 2, "head_dim": 16},
                  max_steps=6, batch_size=4, crop=32, warmup_steps=1, ckpt_every=2, log_every=1, num_workers=0,
                  degradation="realesrgan"),
}


def prompt_choice(u: torch.Tensor, p_negative: float, p_null: float) -> torch.Tensor:
    """(B,) indices into PROMPT_NAMES from uniforms u in [0, 1)."""
    neg, null = PROMPT_NAMES.index("negative"), PROMPT_NAMES.index("null")
    idx = torch.full_like(u, PROMPT_NAMES.index("positive"), dtype=torch.long)
    idx = torch.where(u < p_negative, torch.full_like(idx, neg), idx)
    return torch.where((u >= p_negative) & (u < p_negative + p_null), torch.full_like(idx, null), idx)


def make_loss(cfg: TeacherConfig, codec):
    def loss_fn(field, model: MFSRTransformer, batch, step: int, d) -> torch.Tensor:
        hr, lr, restored, seeds = batch
        gens = batches.per_sample_generators(seeds)
        x = codec.encode(hr)
        c = lr_condition(model, codec, lr, restored)  # as at inference
        which = prompt_choice(batches.per_sample_rand(gens), cfg.p_negative, cfg.p_null).to(x.device)
        neg = (which == PROMPT_NAMES.index("negative")).view(-1, 1, 1, 1)
        # The negative prompt's target: the LR stream's base image (the upsampled LR, or R(LR): what the positive
        # prompt must improve on).
        x = torch.where(neg, c[:, :x.shape[1]], x)
        y = model.to_flow(x, c)  # x, or the scaled residual over R(LR)
        e = batches.per_sample_randn(gens, tuple(y.shape[1:])).to(y.device)
        t = batches.sample_t(gens, cfg).to(y.device)
        tb = t.view(-1, 1, 1, 1)
        z = (1 - tb) * y + tb * e
        v_hat = field(z, c, t, t, prompt=which)  # the prompt is looked up inside forward (FSDP-safe)
        if cfg.loss_space == "x":  # the network's clean estimate, y_hat = z - max(t, x_t_min) v_hat
            y_hat = z - tb.clamp_min(model.cfg.x_t_min) * v_hat
            return (y_hat.float() - y.float()).pow(2).mean()
        return (v_hat.float() - (e - y).float()).pow(2).mean()
    return loss_fn


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TeacherConfig, PRESETS, argv, "Train a flow-matching SR teacher (DESIGN section 2).")
    if cfg.loss_space not in ("v", "x"):
        raise SystemExit(f"--loss-space must be v or x, got {cfg.loss_space!r}")
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = MFSRTransformer.from_preset(cfg.model_preset, **cfg.model_overrides)
    if model.cfg.learned_prompts <= 0:
        raise SystemExit(f"model preset {cfg.model_preset!r} has no learned prompts (learned_prompts = 0)")
    if cfg.loss_space == "x" and model.cfg.prediction == "v":
        raise SystemExit("--loss-space x needs a clean-image prediction (prediction 'x' or 'x_lr')")
    train(cfg, model, make_loss(cfg, codec_for(model, cfg.vae)), name="teacher")
    return 0


if __name__ == "__main__":
    sys.exit(main())
