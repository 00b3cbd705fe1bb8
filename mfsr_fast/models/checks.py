"""Input checks of ``MFSRTransformer``: its config, and every call's arguments (clear ValueErrors that name the
problem, before anything deep can fail)."""

from __future__ import annotations

import torch


def check_inputs(model, z, lr, t, r, context, pooled):
    """Clear ValueErrors for a caller's mistakes in ``model(z, lr, t, r, context, pooled)``, before anything deep can
    fail; returns t and r as (B,) tensors."""
    cfg = model.cfg
    param = model.pos_embed.weight
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"z must be a (B, C, H, W) tensor, got {describe(z)}")
    B, C, H, W = z.shape
    if C != cfg.in_channels:
        raise ValueError(f"z has {C} channels, the model expects {cfg.in_channels}")
    if H % cfg.patch_size or W % cfg.patch_size or H == 0 or W == 0:
        raise ValueError(f"z spatial size {H}x{W} must be positive and divisible by the patch size "
                         f"{cfg.patch_size}")
    if z.dtype != param.dtype:
        raise ValueError(f"z dtype {z.dtype} does not match the model dtype {param.dtype}; cast one of them "
                         f"(e.g. model.to({z.dtype}))")
    if z.device != param.device:
        raise ValueError(f"z is on {z.device}, the model on {param.device}")
    if cfg.lr_stream:
        if lr is None:
            raise ValueError("this model has an LR stream: pass lr, the encoded low-resolution image "
                             "(B, C, H, W) at the output size")
        if not isinstance(lr, torch.Tensor) or lr.dim() != 4:
            raise ValueError(f"lr must be a (B, C, H, W) tensor, got {describe(lr)}")
        if lr.shape[2:] != z.shape[2:]:
            raise ValueError(f"lr spatial size {tuple(lr.shape[2:])} differs from z's {tuple(z.shape[2:])}; "
                             "upsample the LR image to the output size before encoding")
        if lr.shape[0] != B or lr.shape[1] != model.lr_channels:
            raise ValueError(f"lr shape {tuple(lr.shape)} does not match z {tuple(z.shape)}: expected {B} "
                             f"images of {model.lr_channels} channels (lr_source {cfg.lr_source!r})")
        if lr.dtype != z.dtype or lr.device != z.device:
            raise ValueError(f"lr ({lr.dtype}, {lr.device}) must match z ({z.dtype}, {z.device})")
    elif lr is not None:
        raise ValueError("this model has no LR stream (lr_stream=False): pass lr=None")
    t = check_time(t, "t", B, z)
    r = t if r is None else check_time(r, "r", B, z)
    # One host sync for all three checks (each bool() waits for the GPU); the details only when one fails.
    if not torch.compiler.is_compiling() and bool(((t < 0) | (t > 1) | (r < 0) | (r > 1) | (r > t)).any()):
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"t must lie in [0, 1], got values in [{float(t.min()):.4g}, {float(t.max()):.4g}]")
        if bool(((r < 0) | (r > 1)).any()):
            raise ValueError(f"r must lie in [0, 1], got values in [{float(r.min()):.4g}, {float(r.max()):.4g}]")
        if bool((r > t).any()):
            raise ValueError("r must be <= t for every sample (u averages the velocity over [r, t])")
    if context is not None:
        if cfg.context_dim == 0:
            raise ValueError("this model has no context stream (context_dim=0): pass context=None")
        if (not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != B
                or context.shape[2] != cfg.context_dim):
            raise ValueError(f"context must be (B={B}, L, {cfg.context_dim}), got {describe(context)}")
        if context.dtype != z.dtype or context.device != z.device:
            raise ValueError(f"context ({context.dtype}, {context.device}) must match z ({z.dtype}, {z.device})")
    if pooled is not None:
        if cfg.pooled_dim == 0:
            raise ValueError("this model has no pooled projection (pooled_dim=0): pass pooled=None")
        if not isinstance(pooled, torch.Tensor) or pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be (B={B}, {cfg.pooled_dim}), got {describe(pooled)}")
        if pooled.dtype != z.dtype or pooled.device != z.device:
            raise ValueError(f"pooled ({pooled.dtype}, {pooled.device}) must match z ({z.dtype}, {z.device})")
    return t, r


def check_time(t, name: str, B: int, z: torch.Tensor) -> torch.Tensor:
    if isinstance(t, (int, float)):
        t = torch.full((B,), float(t), device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape (B,) = ({B},) or a float, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != z.device:
        raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
    return t


def check_tangents(z: torch.Tensor, tangents) -> tuple:
    """(tz, tt, tr) from ``tangents`` (None: all None), each None or of the shape its primal has."""
    if tangents is None:
        return None, None, None
    if not isinstance(tangents, (tuple, list)) or len(tangents) != 3:
        raise ValueError("tangents must be a tuple (tz, tt, tr), each a tensor or None")
    tz, tt, tr = tangents
    B = z.shape[0]
    if tz is not None and tz.shape != z.shape:
        raise ValueError(f"the tangent of z must have z's shape {tuple(z.shape)}, got {describe(tz)}")
    for name, tan in (("t", tt), ("r", tr)):
        if tan is not None and (not isinstance(tan, torch.Tensor) or tan.shape != (B,)):
            raise ValueError(f"the tangent of {name} must be a (B,) = ({B},) tensor, got {describe(tan)}")
    return tz, tt, tr


def check_config(cfg) -> None:
    """Clear ValueErrors for an MFSRConfig that cannot work."""
    if cfg.prediction not in ("v", "x", "x_lr"):
        raise ValueError(f"prediction must be 'v', 'x' or 'x_lr', got {cfg.prediction!r}")
    if cfg.lr_source not in ("bicubic", "restorer", "both"):
        raise ValueError(f"lr_source must be 'bicubic', 'restorer' or 'both', got {cfg.lr_source!r}")
    if cfg.lr_source != "bicubic" and not (cfg.lr_stream and cfg.restorer):
        raise ValueError(f"lr_source {cfg.lr_source!r} needs the LR stream and a restorer name")
    if cfg.residual_scale < 0 or (cfg.residual_scale > 0 and (not cfg.lr_stream or cfg.prediction == "x_lr")):
        raise ValueError("residual_scale must be >= 0; a residual flow needs the LR stream and prediction 'v' or 'x' "
                         "('x_lr' already adds the base)")
    if cfg.conv_head < 0:
        raise ValueError(f"conv_head must be >= 0, got {cfg.conv_head}")
    if cfg.codec not in ("sd3-vae", "pixel4"):
        raise ValueError(f"codec must be 'sd3-vae' or 'pixel4', got {cfg.codec!r}")
    if cfg.learned_prompts > 0 and cfg.context_dim <= 0:
        raise ValueError("learned_prompts needs a context stream (context_dim > 0)")
    if cfg.qk_norm not in (None, "rms_norm"):
        raise ValueError(f"qk_norm must be None or 'rms_norm', got {cfg.qk_norm!r}")
    if cfg.num_layers < 1 or cfg.num_heads < 1 or cfg.head_dim < 1 or cfg.patch_size < 1 or cfg.in_channels < 1:
        raise ValueError(f"sizes must be positive: {cfg}")
    if (cfg.num_heads * cfg.head_dim) % 4:
        raise ValueError("num_heads * head_dim must be divisible by 4 (2-D sin-cos positions)")
    bad = [i for i in cfg.dual_attention_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"dual_attention_layers {bad} outside [0, {cfg.num_layers})")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
