"""MFSRTransformer: SD3.5 MM-DiT with a DiT4SR low-resolution stream and dual (t, h = t - r) time conditioning.

Architecture (DESIGN section 4):
- SD3 / SD3.5-medium MM-DiT (Esser et al. 2024): patch embedding with 2-D sin-cos positions, joint attention over
  image and context tokens with QK RMSNorm, adaLN-Zero, "MMDiT-X" image-only second attention on chosen blocks.
- DiT4SR (Duan et al. 2025): the LR image, encoded and patchified like the noisy latent, is a third token stream.
  It shares the image stream's adaLN and feed-forward weights, has zero-initialised q/k/v "control" projections
  applied after the image projections, its own output projection (a copy of the image one), and a zero-initialised
  depthwise 3x3 conv on its feed-forward hidden features that is added (x 1.2) to the image stream's.
- MeanFlow (Geng et al. 2025): the network takes (t, r) and predicts the average velocity u(z_t, r, t); t and
  h = t - r each have a sinusoidal + MLP embedder, summed. The h embedder's last layer starts at zero, so a student
  initialised from a teacher equals the teacher when r = t.

- Restorer conditioning (DESIGN section 8): the LR stream may see R(LR), the output of a frozen pretrained x4
  restorer (Real-ESRGAN x4plus, ``mfsr_fast.models.restorer``), instead of (or before) the bicubic-upsampled LR, and the
  flow may run over the scaled residual y = (x - R(LR)) / residual_scale (``to_flow`` / ``from_flow``), so that a
  zero network output is R(LR) itself and the model only learns what R lacks.

Forward-mode tangents: ``forward(..., tangents=(tz, tt, tr))`` also returns du along them, computed layer by layer
in the same call (MeanFlow's target without torch.func.jvp; tests/test_model_jvp.py): every layer takes and returns
``Dual`` (primal, tangent) pairs and is written once with the pair operations of ``models.tangent``, each of which
puts the tangent formula next to its primal op. Input checks live in ``models.checks``.

Time convention: t in [0, 1], t = 1 is noise, z_t = (1 - t) x + t e (diffusers' FlowMatchEulerDiscreteScheduler:
sigma = t, timestep = 1000 t). Every attention goes through ``kernels.attention``, every adaLN modulation through
``kernels.adaln_modulate``.

Shapes: z, lr (B, C, H, W) with H, W divisible by the patch size; t, r (B,); context (B, Lc, context_dim);
pooled (B, pooled_dim). Output u: (B, C, H, W). Dtypes: fp32, bf16, fp16, fp64 (the parameters' dtype).

Caution:
- Positions beyond ``pos_embed_max_size`` patches extrapolate the sin-cos grid instead of raising as diffusers does.
- ``dit4sr_norm_k_bug`` reproduces the released DiT4SR code, which computes the LR keys by applying norm_k to the
  already normalised image keys (its to_k_control is then unused); leave it off unless you load those weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from mfsr_fast.models import checks
from mfsr_fast.models.tangent import (
    Dual,
    add,
    attention,
    cat,
    chunk,
    conv2d,
    gated,
    gelu_tanh,
    linear,
    modulate,
    rms_norm,
    scale,
    silu,
    sum_tangents,
)


@dataclass(frozen=True)
class MFSRConfig:
    """Every architecture knob of MFSRTransformer; presets below, overrides through ``from_preset``."""

    in_channels: int = 16
    patch_size: int = 2
    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    context_dim: int = 4096  # width of the context tokens given to forward (T5/CLIP features); 0: no context stream
    pooled_dim: int = 2048  # width of the pooled embedding; 0: no pooled projection
    sample_size: int = 128  # latent size the sin-cos grid is scaled for (base size = sample_size // patch_size)
    pos_embed_max_size: int = 384  # patches per side of the centred sin-cos grid
    dual_attention_layers: tuple[int, ...] = tuple(range(13))  # MMDiT-X image-only attention on these blocks
    qk_norm: str | None = "rms_norm"  # "rms_norm" or None
    lr_stream: bool = True  # DiT4SR LR stream
    lr_conv_scale: float = 1.2  # weight of the cross-stream depthwise conv
    lr_attn_residual: bool = True  # DiT4SR adds the LR stream's attention input to its attention output
    dit4sr_norm_k_bug: bool = False  # reproduce released DiT4SR: LR keys = norm_k(norm_k(image keys))
    timestep_scale: float = 1000.0  # the embedders see 1000 t and 1000 (t - r), as SD3 sees its timesteps
    time_freq_dim: int = 256
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    # Network output: "v" (velocity), "x" (clean image; v = (z - x) / max(t, x_t_min)), or "x_lr" (the clean image as
    # a residual over the LR stream's input: x = lr + output, so a zero-initialised model starts as the upsampled LR).
    prediction: str = "v"
    x_t_min: float = 0.05
    codec: str = "sd3-vae"  # image <-> model space: "sd3-vae" (16-channel latents) or "pixel4" (pixel-unshuffle x4)
    learned_prompts: int = 0  # > 0: learned context tokens per named prompt (PROMPT_NAMES), stored with the weights
    # What the LR stream sees (DESIGN section 8): "bicubic" (the upsampled LR), "restorer" (R(LR), the frozen restorer
    # named by ``restorer``) or "both" (R(LR) and the upsampled LR, concatenated along channels; the second through its
    # own zero-initialised patch embedding). The first image is the "base" of x_lr predictions and residual flows.
    lr_source: str = "bicubic"
    restorer: str = ""  # the restorer's name or folder (mfsr_fast.models.restorer.resolve_restorer)
    # > 0: the flow runs over the scaled residual y = (x - base) / residual_scale instead of x, so noise at t = 1 is
    # the base image plus residual_scale e, and a zero output (prediction "x") is the base image itself.
    residual_scale: float = 0.0
    # > 0: a convolutional head that sees across patches. The read-out gives each model-space pixel ``conv_head``
    # feature channels beside its output; two 3 x 3 convolutions over both add a correction to the output (the
    # second zero-initialised). A linear read-out per token alone leaves a step at every patch edge (the patch grid,
    # docs/results/how-the-default-was-made.md); the head can remove it. 0: the linear read-out only (SD3 / DiT4SR).
    conv_head: int = 0


# Keys of config.json that only chose how a model is sampled, in folders written before samplers had their own file
# (``mfsr_fast.sampling.config`` reads them there); not the architecture's, so loading leaves them out.
LEGACY_SAMPLER_KEYS = ("refine_t", "jump", "refine_side", "flat_detail")

# Named learned prompts of models trained without a text encoder (DESIGN section 3 / training/teacher.py).
PROMPT_NAMES = ("positive", "negative", "null")

PRESETS: dict[str, dict] = {
    # SD3.5-medium MM-DiT + DiT4SR LR stream: 2.5B parameters, GPU only.
    "dit4sr": {},
    # CPU presets over a pixel codec (pixel-unshuffle x4 of RGB = 48 channels), no text encoder: learned prompt tokens.
    "small": dict(in_channels=48, num_layers=6, num_heads=4, head_dim=64, context_dim=256, pooled_dim=256,
                  sample_size=64, pos_embed_max_size=256, dual_attention_layers=(0, 1, 2), prediction="x_lr",
                  codec="pixel4", learned_prompts=4),
    "tiny": dict(in_channels=48, num_layers=4, num_heads=4, head_dim=32, context_dim=128, pooled_dim=128,
                 sample_size=32, pos_embed_max_size=256, dual_attention_layers=(0, 1), prediction="x_lr",
                 codec="pixel4", learned_prompts=4),
    # tiny over Real-ESRGAN x4plus (DESIGN section 8): the LR stream sees R(LR) and the upsampled LR (which shows how
    # degraded the input was, which R(LR) hides), the flow runs over the residual HR - R(LR) scaled by
    # 1 / residual_scale (docs/results/how-the-default-was-made.md), and the network predicts that residual (zero:
    # exactly R(LR)).
    "tiny-r": dict(in_channels=48, num_layers=4, num_heads=4, head_dim=32, context_dim=128, pooled_dim=128,
                   sample_size=32, pos_embed_max_size=256, dual_attention_layers=(0, 1), prediction="x",
                   codec="pixel4", learned_prompts=4, lr_source="both", restorer="realesrgan-x4plus",
                   residual_scale=0.25, conv_head=16),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of t (B,) -> (B, dim), as diffusers' Timesteps(flip_sin_to_cos=True, shift=0).

    Computed in t's dtype (at least fp32) so that fp64 checks and forward-mode tangents stay exact.
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(dtype)[:, None] * freqs.to(dtype)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def timestep_embedding_tangent(t: torch.Tensor, tt: torch.Tensor, dim: int, max_period: float = 10000.0
                               ) -> torch.Tensor:
    """Tangent of ``timestep_embedding`` at t for the tangent tt (B,): [-sin(a), cos(a)] * tt * freqs."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(dtype)[:, None] * freqs.to(dtype)[None, :]  # (B, half)
    targs = tt.to(dtype)[:, None] * freqs.to(dtype)[None, :]
    emb = torch.cat([-torch.sin(args) * targs, torch.cos(args) * targs], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_pos_embed(dim: int, h: int, w: int, max_size: int, base_size: int, device=None) -> torch.Tensor:
    """SD3's 2-D sin-cos positions, centre-cropped from a max_size x max_size grid -> (h * w, dim) in fp32.

    Token (i, j) gets [sincos(x = j'), sincos(y = i')] with positions j' = (left + j) / (max_size / base_size).
    """
    top, left = (max_size - h) // 2, (max_size - w) // 2
    ys = torch.arange(top, top + h, device=device, dtype=torch.float32) / (max_size / base_size)
    xs = torch.arange(left, left + w, device=device, dtype=torch.float32) / (max_size / base_size)
    quarter = dim // 4
    omega = torch.arange(quarter, device=device, dtype=torch.float64) / quarter
    omega = 1.0 / 10000 ** omega  # (dim / 4,)

    def embed(pos):  # (n,) -> (n, dim / 2)
        out = pos.double()[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ex = embed(xs)[None, :, :].expand(h, w, 2 * quarter)  # (h, w, dim / 2)
    ey = embed(ys)[:, None, :].expand(h, w, 2 * quarter)  # (h, w, dim / 2)
    return torch.cat([ex, ey], dim=-1).reshape(h * w, dim).float()


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned weight, statistics in fp32 (as diffusers' RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps).to(x.dtype) * self.weight.to(x.dtype)

    @torch.no_grad()
    def tangent(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        """w * rho * (t - x * rho^2 * mean(x t)) with rho = rsqrt(mean(x^2) + eps), in fp32 (at least)."""
        if t is None:
            return None
        acc = torch.promote_types(x.dtype, torch.float32)
        xa, ta = x.detach().to(acc), t.to(acc)
        rho = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (ta - xa * rho.pow(2) * (xa * ta).mean(-1, keepdim=True)) * rho * self.weight.detach().to(acc)
        return out.to(x.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Dual) -> Dual:
        return linear(self.linear_2, silu(linear(self.linear_1, x)))


class Attention(nn.Module):
    """Multi-head attention over an image stream [z; lr] and, when given, a context stream.

    to_q/k/v/out act on the image tokens, add_q/k/v and to_add_out on context tokens, *_control on LR tokens.
    """

    def __init__(self, cfg: MFSRConfig, context: bool, context_out: bool):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        self.cfg = cfg
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm == "rms_norm" else None
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm == "rms_norm" else None
        if context:
            # Without context output (SD3's last block) the context only gives keys and values: no queries.
            if context_out:
                self.add_q_proj = nn.Linear(dim, dim)
                self.norm_added_q = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm == "rms_norm" else None
                self.to_add_out = nn.Linear(dim, dim)
            self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_added_k = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm == "rms_norm" else None
        self.context_out = context and context_out
        if cfg.lr_stream:
            self.to_q_control, self.to_k_control, self.to_v_control = (nn.Linear(dim, dim), nn.Linear(dim, dim),
                                                                       nn.Linear(dim, dim))
            self.to_out_control = nn.Linear(dim, dim)

    def _proj(self, lins, norm, x: Dual) -> Dual:
        """Linears (one after another), split into heads (B, H, L, Dh), then the optional RMSNorm."""
        for lin in lins:
            x = linear(lin, x)
        return rms_norm(norm, x.map(lambda a: a.unflatten(-1, (self.cfg.num_heads, self.cfg.head_dim)).transpose(1, 2)))

    def forward(self, x: Dual, n_img: int, c: Dual | None = None, backend: str = "auto") -> tuple[Dual, Dual | None]:
        """x: (B, N [+ N_lr], D) image tokens, the first n_img from z; c: (B, Lc, D) context or None.
        -> (image tokens out, context tokens out or None)."""
        x_img, x_lr = x.map(lambda a: a[:, :n_img]), x.map(lambda a: a[:, n_img:])
        q = [self._proj([self.to_q], self.norm_q, x_img)]  # (B, H, N, Dh)
        k_img = self._proj([self.to_k], self.norm_k, x_img)
        k, v = [k_img], [self._proj([self.to_v], None, x_img)]
        if x_lr.p.shape[1]:
            # DiT4SR: control projections applied after the shared image projections. The released code's keys:
            # key_control = norm_k(key) after key = norm_k(key), the image keys normalised twice.
            q.append(self._proj([self.to_q, self.to_q_control], self.norm_q, x_lr))
            k.append(rms_norm(self.norm_k, k_img) if self.cfg.dit4sr_norm_k_bug
                     else self._proj([self.to_k, self.to_k_control], self.norm_k, x_lr))
            v.append(self._proj([self.to_v, self.to_v_control], None, x_lr))
        if c is not None:
            if self.context_out:
                q.append(self._proj([self.add_q_proj], self.norm_added_q, c))
            k.append(self._proj([self.add_k_proj], self.norm_added_k, c))
            v.append(self._proj([self.add_v_proj], None, c))
        o = attention(cat(q, 2), cat(k, 2), cat(v, 2), backend)  # (B, H, Lq, Dh)
        return self._out(o.map(lambda a: a.transpose(1, 2).flatten(2)), x_lr, n_img, x.p.shape[1], c)

    def _out(self, o: Dual, x_lr: Dual, n_img: int, n_x: int, c: Dual | None) -> tuple[Dual, Dual | None]:
        """Output projections of the attended tokens o (B, Lq, D): image, LR (with DiT4SR's residual), context."""
        out = linear(self.to_out, o.map(lambda a: a[:, :n_img]))  # (B, N, D)
        if x_lr.p.shape[1]:
            o_lr = o.map(lambda a: a[:, n_img:n_x])  # (B, N_lr, D)
            if self.cfg.lr_attn_residual:
                o_lr = add(o_lr, x_lr)
            out = cat([out, linear(self.to_out_control, o_lr)], 1)  # (B, N + N_lr, D)
        if c is None or not self.context_out:
            return out, None
        return out, linear(self.to_add_out, o.map(lambda a: a[:, n_x:]))  # (B, Lc, D)


class FeedForward(nn.Module):
    """GELU(tanh) MLP; with the LR stream, a depthwise 3x3 conv of the LR hidden map is added to the image one."""

    def __init__(self, cfg: MFSRConfig, lr_conv: bool):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        hidden = int(dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.control_conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if lr_conv else None
        self.lr_conv_scale = cfg.lr_conv_scale

    def forward(self, x: Dual, n_img: int, grid: tuple[int, int]) -> Dual:
        """(B, L, D) -> (B, L, D); ``grid`` = (Hp, Wp), the token grid of the LR stream's hidden map."""
        a = gelu_tanh(linear(self.fc1, x))  # (B, L, 4D)
        if self.control_conv is not None and x.p.shape[1] > n_img:
            lr_map = a.map(lambda u: u[:, n_img:].transpose(1, 2).unflatten(2, grid))  # (B, 4D, Hp, Wp)
            cross = conv2d(self.control_conv, lr_map).map(lambda u: u.flatten(2).transpose(1, 2))  # (B, N, 4D)
            a = cat([add(a.map(lambda u: u[:, :n_img]), scale(cross, self.lr_conv_scale)),
                     a.map(lambda u: u[:, n_img:])], 1)  # (B, 2N, 4D)
        return linear(self.fc2, a)


# adaLN-Zero modulation chunks, in the order the norm1 / norm1_context linears emit them (SD3's layout). The last
# block's context modulation is AdaLayerNormContinuous's: scale first, then shift.
IMAGE_MOD = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
DUAL_MOD = IMAGE_MOD + ("shift_msa2", "scale_msa2", "gate_msa2")  # MMDiT-X: the image-only attention's
LAST_CONTEXT_MOD = ("scale_msa", "shift_msa")


def _modulation(lin: nn.Linear, st: Dual, names: tuple[str, ...]) -> SimpleNamespace:
    """The named (B, D) chunks of lin(silu(temb))."""
    return SimpleNamespace(**dict(zip(names, chunk(linear(lin, st), len(names)))))


class JointBlock(nn.Module):
    """One MM-DiT block: adaLN-Zero modulation, joint attention, optional image-only attention, feed-forward."""

    def __init__(self, cfg: MFSRConfig, dual: bool, last: bool):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        self.cfg, self.dual, self.last = cfg, dual, last
        has_ctx = cfg.context_dim > 0
        self.norm1 = nn.Linear(dim, len(DUAL_MOD if dual else IMAGE_MOD) * dim)
        self.attn = Attention(cfg, context=has_ctx, context_out=not last)
        self.attn2 = Attention(cfg, context=False, context_out=False) if dual else None
        self.ff = FeedForward(cfg, lr_conv=cfg.lr_stream)
        if has_ctx:
            # The last block only feeds the context into attention (SD3's context_pre_only): scale/shift only.
            self.norm1_context = nn.Linear(dim, len(LAST_CONTEXT_MOD if last else IMAGE_MOD) * dim)
            self.ff_context = None if last else FeedForward(dataclasses.replace(cfg, lr_stream=False), lr_conv=False)

    def forward(self, x: Dual, c: Dual | None, temb: Dual, n_img: int, grid: tuple[int, int],
                backend: str = "auto") -> tuple[Dual, Dual | None]:
        """x: (B, N [+ N_lr], D), c: (B, Lc, D) or None, temb: (B, D) -> updated (x, c); c is None after the last
        block."""
        ada = functools.partial(modulate, eps=self.cfg.eps, backend=backend)
        st = silu(temb)
        m = _modulation(self.norm1, st, DUAL_MOD if self.dual else IMAGE_MOD)
        y = ada(x, m.shift_msa, m.scale_msa)  # (B, N, D)
        # MMDiT-X: a second modulation of the same input feeds the image-only attention.
        y2 = ada(x, m.shift_msa2, m.scale_msa2) if self.dual else None
        yc = mc = None
        if c is not None:
            mc = _modulation(self.norm1_context, st, LAST_CONTEXT_MOD if self.last else IMAGE_MOD)
            yc = ada(c, mc.shift_msa, mc.scale_msa)  # (B, Lc, D)
        a, ac = self.attn(y, n_img, yc, backend)
        if self.dual:
            x = gated(x, m.gate_msa, a)
            x, y = ada(x, m.shift_mlp, m.scale_mlp, gate=m.gate_msa2, h=self.attn2(y2, n_img, None, backend)[0])
        else:
            x, y = ada(x, m.shift_mlp, m.scale_mlp, gate=m.gate_msa, h=a)
        x = gated(x, m.gate_mlp, self.ff(y, n_img, grid))
        if c is None or self.last:
            return x, None
        c, yc = ada(c, mc.shift_mlp, mc.scale_mlp, gate=mc.gate_msa, h=ac)
        return x, gated(c, mc.gate_mlp, self.ff_context(yc, yc.p.shape[1], (0, 0)))


class MFSRTransformer(ModelMixin, ConfigMixin):
    """u = model(z, lr, t, r, context=None, pooled=None): average velocity over [r, t] for the noisy latent z.

    Build with ``MFSRTransformer.from_preset(name, **overrides)``; save/load with diffusers' ``save_pretrained`` /
    ``from_pretrained`` (config.json + model.safetensors).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: int = 2,
        num_layers: int = 24,
        num_heads: int = 24,
        head_dim: int = 64,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        sample_size: int = 128,
        pos_embed_max_size: int = 384,
        dual_attention_layers: tuple[int, ...] = tuple(range(13)),
        qk_norm: str | None = "rms_norm",
        lr_stream: bool = True,
        lr_conv_scale: float = 1.2,
        lr_attn_residual: bool = True,
        dit4sr_norm_k_bug: bool = False,
        timestep_scale: float = 1000.0,
        time_freq_dim: int = 256,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        prediction: str = "v",
        x_t_min: float = 0.05,
        codec: str = "sd3-vae",
        learned_prompts: int = 0,
        lr_source: str = "bicubic",
        restorer: str = "",
        residual_scale: float = 0.0,
        conv_head: int = 0,
    ):
        # Keyword arguments mirror MFSRConfig field by field: diffusers' ConfigMixin reads the signature.
        super().__init__()
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        kwargs["dual_attention_layers"] = tuple(int(i) for i in dual_attention_layers)
        cfg = MFSRConfig(**kwargs)
        checks.check_config(cfg)
        self.cfg = cfg
        self.kernel_backend = "auto"
        self._build(cfg)
        self.initialize_weights()

    def _build(self, cfg: MFSRConfig) -> None:
        """The layers, in the order ``initialize_weights`` draws their random values."""
        dim = cfg.num_heads * cfg.head_dim
        p = cfg.patch_size
        self.pos_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        # lr_source "both": the second LR image's own patch embedding, added to the LR tokens (zero at init).
        self.lr_embed_extra = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p) if cfg.lr_source == "both" \
            else None
        self.time_embed = MLPEmbedder(cfg.time_freq_dim, dim)
        self.h_embed = MLPEmbedder(cfg.time_freq_dim, dim)
        self.pooled_embed = MLPEmbedder(cfg.pooled_dim, dim) if cfg.pooled_dim > 0 else None
        self.context_embed = nn.Linear(cfg.context_dim, dim) if cfg.context_dim > 0 else None
        self.blocks = nn.ModuleList([
            JointBlock(cfg, dual=i in cfg.dual_attention_layers, last=i == cfg.num_layers - 1)
            for i in range(cfg.num_layers)
        ])
        self.norm_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, p * p * (cfg.in_channels + cfg.conv_head))
        if cfg.conv_head > 0:
            width = cfg.in_channels + cfg.conv_head
            self.head_conv1 = nn.Conv2d(width, width, kernel_size=3, padding=1)
            self.head_conv2 = nn.Conv2d(width, cfg.in_channels, kernel_size=3, padding=1)
        else:
            self.head_conv1 = self.head_conv2 = None
        if cfg.learned_prompts > 0:
            n = len(PROMPT_NAMES)
            self.prompt_context = nn.Parameter(torch.zeros(n, cfg.learned_prompts, cfg.context_dim))
            self.prompt_pooled = nn.Parameter(torch.zeros(n, cfg.pooled_dim)) if cfg.pooled_dim > 0 else None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' reading of config.json (``from_pretrained``, ``from_config``), without the sampler keys older
        folders hold (``LEGACY_SAMPLER_KEYS``)."""
        config_dict = {k: v for k, v in config_dict.items() if k not in LEGACY_SAMPLER_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MFSRTransformer:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(MFSRConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
        kwargs = {**dataclasses.asdict(MFSRConfig(**PRESETS[name])), **overrides}
        return cls(**kwargs)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT-style init: xavier linears, zero adaLN and output layers (adaLN-Zero), DiT4SR zero control layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.pos_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.bias)
        if self.lr_embed_extra is not None:
            nn.init.zeros_(self.lr_embed_extra.weight)
            nn.init.zeros_(self.lr_embed_extra.bias)
        for emb in (self.time_embed, self.h_embed):
            nn.init.normal_(emb.linear_1.weight, std=0.02)
            nn.init.normal_(emb.linear_2.weight, std=0.02)
        # MeanFlow: h = t - r enters at zero, so the student starts as the teacher for r = t.
        nn.init.zeros_(self.h_embed.linear_2.weight)
        for blk in self.blocks:
            nn.init.zeros_(blk.norm1.weight)
            nn.init.zeros_(blk.norm1.bias)
            if self.cfg.context_dim > 0:
                nn.init.zeros_(blk.norm1_context.weight)
                nn.init.zeros_(blk.norm1_context.bias)
            if self.cfg.lr_stream:
                self.zero_init_lr_stream(blk)
        nn.init.zeros_(self.norm_out.weight)
        nn.init.zeros_(self.norm_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if self.head_conv2 is not None:
            nn.init.zeros_(self.head_conv2.weight)
            nn.init.zeros_(self.head_conv2.bias)
        if self.cfg.learned_prompts > 0:
            nn.init.normal_(self.prompt_context, std=1.0)  # distinct prompts from the start
            if self.prompt_pooled is not None:
                nn.init.normal_(self.prompt_pooled, std=1.0)

    @staticmethod
    @torch.no_grad()
    def zero_init_lr_stream(blk: JointBlock) -> None:
        """DiT4SR init of one block's LR stream: zero control q/k/v and conv, output projections copied."""
        for attn in (blk.attn, blk.attn2):
            if attn is None:
                continue
            for lin in (attn.to_q_control, attn.to_k_control, attn.to_v_control):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            attn.to_out_control.weight.copy_(attn.to_out.weight)
            attn.to_out_control.bias.copy_(attn.to_out.bias)
        nn.init.zeros_(blk.ff.control_conv.weight)
        nn.init.zeros_(blk.ff.control_conv.bias)

    def set_kernel_backend(self, backend: str) -> MFSRTransformer:
        """'auto' | 'triton' | 'reference' for every attention and adaLN call of this model."""
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.kernel_backend = backend
        return self

    def forward(self, z: torch.Tensor, lr: torch.Tensor | None, t, r=None, context: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, prompt=None, tangents=None):
        """Average velocity u(z, r, t) (B, C, H, W). r defaults to t (instantaneous velocity, the teacher).
        ``prompt``: a stored prompt (a name or (B,) indices, see ``prompt``) instead of context and pooled; looked up
        inside forward, where FSDP has gathered the weights.

        ``tangents`` = (tz, tt, tr) (each None = zero) returns (u, du): u as without tangents (differentiable in
        reverse mode) and its forward-mode derivative along (tz, tt, tr), detached, from one explicit tangent pass
        (``models.tangent``; no torch.func.jvp: works through DDP and FSDP wrappers, which only see ``__call__``,
        and costs far less host time); equal to ``torch.func.jvp`` of the same call within rounding
        (tests/test_model_jvp.py)."""
        if prompt is not None:
            if context is not None or pooled is not None:
                raise ValueError("pass either prompt or context/pooled, not both")
            context, pooled = self.prompt(prompt, z.shape[0] if isinstance(z, torch.Tensor) else None)
        t, r = checks.check_inputs(self, z, lr, t, r, context, pooled)
        tz, tt, tr = checks.check_tangents(z, tangents)
        B, C, H, W = z.shape
        grid = (H // self.cfg.patch_size, W // self.cfg.patch_size)
        x = self._tokens(z, lr, tz, grid)  # (B, N [+ N_lr], D)
        temb = self._conditioning(t, r, tt, tr, pooled, B, z.dtype)  # (B, D)
        c = None if context is None else Dual(self.context_embed(context))  # (B, Lc, D)
        n_img = grid[0] * grid[1]
        for blk in self.blocks:
            x, c = blk(x, c, temb, n_img, grid, backend=self.kernel_backend)
        out = self._read_out(x.map(lambda a: a[:, :n_img]), temb, grid)  # only the noisy-latent tokens
        if tangents is None:
            return out.p
        return out.p, (torch.zeros_like(out.p) if out.t is None else out.t)

    def _tokens(self, z: torch.Tensor, lr: torch.Tensor | None, tz: torch.Tensor | None, grid) -> Dual:
        """Patch embeddings plus sin-cos positions of z and, with the LR stream, of lr: (B, N [+ N_lr], D)."""
        C = self.cfg.in_channels
        pos = sincos_pos_embed(self.inner_dim, *grid, self.cfg.pos_embed_max_size,
                               self.cfg.sample_size // self.cfg.patch_size, device=z.device).to(z.dtype)  # (N, D)
        tokens = lambda a: a.flatten(2).transpose(1, 2)  # noqa: E731  (B, D, Hp, Wp) -> (B, N, D)
        x = conv2d(self.pos_embed, Dual(z, None if tz is None else tz.to(z.dtype))).map(tokens)
        x = Dual(x.p + pos, x.t)
        if lr is None:
            return x
        x_lr = tokens(self.pos_embed(lr[:, :C])) + pos  # (B, N, D)
        if self.lr_embed_extra is not None:
            x_lr = x_lr + tokens(self.lr_embed_extra(lr[:, C:]))
        return cat([x, Dual(x_lr)], 1)  # (B, 2N, D)

    def _conditioning(self, t, r, tt, tr, pooled, B: int, dtype) -> Dual:
        """Dual time conditioning: embedders of t and h = t - r (timesteps scaled by timestep_scale), summed, plus
        the pooled projection: (B, D)."""
        k, dim = self.cfg.timestep_scale, self.cfg.time_freq_dim
        with torch.no_grad():
            th = sum_tangents(tt, None if tr is None else -tr)
            ts_t, ts_h = (None if tt is None else tt * k), (None if th is None else th * k)
        s_t, s_h = Dual(t * k, ts_t), Dual((t - r) * k, ts_h)

        def features(s: Dual) -> Dual:
            with torch.no_grad():
                ts = None if s.t is None else timestep_embedding_tangent(s.p, s.t, dim).to(dtype)
            return Dual(timestep_embedding(s.p, dim).to(dtype), ts)

        temb = add(self.time_embed(features(s_t)), self.h_embed(features(s_h)))
        if self.pooled_embed is None:
            return temb
        pooled = pooled if pooled is not None else torch.zeros(B, self.cfg.pooled_dim, dtype=dtype,
                                                               device=t.device)
        return add(temb, self.pooled_embed(Dual(pooled)))

    def _read_out(self, x: Dual, temb: Dual, grid) -> Dual:
        """Final adaLN, the linear read-out to patches and, with ``conv_head``, the head across patches."""
        p, Co = self.cfg.patch_size, self.cfg.in_channels + self.cfg.conv_head
        scale_, shift = chunk(linear(self.norm_out, silu(temb)), 2)  # (B, D) each: scale first
        x = modulate(x, shift, scale_, eps=self.cfg.eps, backend=self.kernel_backend)  # (B, N, D)
        x = linear(self.proj_out, x)  # (B, N, p * p * Co)
        B, (hp, wp) = x.p.shape[0], grid
        out = x.map(lambda a: a.reshape(B, hp, wp, p, p, Co).permute(0, 5, 1, 3, 2, 4).reshape(B, Co, hp * p,
                                                                                             wp * p))
        return out if self.head_conv1 is None else self._conv_head(out)

    def _conv_head(self, o: Dual) -> Dual:
        """(B, C + conv_head, H, W) read-out -> (B, C, H, W): o[:, :C] + conv2(silu(conv1(o))), a correction that
        sees across patch edges."""
        C = self.cfg.in_channels
        return add(o.map(lambda a: a[:, :C]), conv2d(self.head_conv2, silu(conv2d(self.head_conv1, o))))

    def prompt(self, which, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled) of learned prompts: ``which`` is a name from PROMPT_NAMES (repeated ``batch`` times) or a
        (B,) tensor of indices into PROMPT_NAMES."""
        if self.cfg.learned_prompts <= 0:
            raise ValueError("this model has no learned prompts (learned_prompts = 0): pass context and pooled")
        if isinstance(which, str):
            if which not in PROMPT_NAMES:
                raise ValueError(f"unknown prompt {which!r}; known: {PROMPT_NAMES}")
            idx = torch.full((batch or 1,), PROMPT_NAMES.index(which), dtype=torch.long,
                             device=self.prompt_context.device)
        else:
            idx = torch.as_tensor(which, dtype=torch.long, device=self.prompt_context.device)
        pooled = self.prompt_pooled[idx] if self.prompt_pooled is not None else None
        return self.prompt_context[idx], pooled

    @torch.no_grad()
    def set_prompts(self, context: torch.Tensor, pooled: torch.Tensor | None, *, trainable: bool = False) -> None:
        """Store fixed prompt embeddings in the model (e.g. from ``models.prompts``): ``context`` (3, L, context_dim)
        and ``pooled`` (3, pooled_dim) in PROMPT_NAMES order. They become the model's prompts (``learned_prompts =
        L``), travel with ``save_pretrained``, and are frozen unless ``trainable``."""
        cfg = self.cfg
        n = len(PROMPT_NAMES)
        if context.dim() != 3 or context.shape[0] != n or context.shape[2] != cfg.context_dim:
            raise ValueError(f"prompt context must be ({n}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if (pooled is None) != (cfg.pooled_dim == 0) or (pooled is not None and pooled.shape != (n, cfg.pooled_dim)):
            raise ValueError(f"prompt pooled must be ({n}, {cfg.pooled_dim}), got "
                             f"{None if pooled is None else tuple(pooled.shape)}")
        ref = self.pos_embed.weight
        self.prompt_context = nn.Parameter(context.to(ref), requires_grad=trainable)
        self.prompt_pooled = (nn.Parameter(pooled.to(ref), requires_grad=trainable) if pooled is not None else None)
        self.cfg = dataclasses.replace(cfg, learned_prompts=context.shape[1])
        self.register_to_config(learned_prompts=context.shape[1])

    @torch.no_grad()
    def grown(self, extra: int) -> MFSRTransformer:
        """A deeper model that computes exactly this one's function: ``extra`` blocks inserted before the last one,
        each a copy of the block before it (of the last block's weights, where it is the only one; what that block
        lacks, the context stream's output parts, as a fresh block has it) with its adaLN-Zero gates (image and
        context streams) at zero, so that it starts as the identity and learns from there. Distillation uses it to
        give a student more capacity than its teacher (``training.distill --grow-layers``). Image-only attention
        layers keep their places; the copies take the copied block's kind. Same dtype and device; parameters frozen
        or not as their originals."""
        if extra < 0:
            raise ValueError(f"extra must be >= 0, got {extra}")
        n = self.cfg.num_layers
        src = max(n - 2, 0)  # the block the copies start from
        dual = sorted({i + (extra if i == n - 1 else 0) for i in self.cfg.dual_attention_layers}
                      | ({*range(n - 1, n - 1 + extra)} if src in self.cfg.dual_attention_layers else set()))
        ref = self.pos_embed.weight
        big = type(self)(**{**dataclasses.asdict(self.cfg), "num_layers": n + extra,
                            "dual_attention_layers": tuple(dual)})
        nn.Module.to(big, device=ref.device, dtype=ref.dtype)  # (diffusers' to() warns on any dtype)

        def source(k: str) -> str:  # the name in this model of a parameter or buffer of the grown one
            if not k.startswith("blocks."):
                return k
            _, i, rest = k.split(".", 2)
            i = int(i)
            if n - 1 <= i < n - 1 + extra:  # a copy
                i = src
            elif i >= n - 1 + extra:  # the last block
                i -= extra
            return f"blocks.{i}.{rest}"

        mine, state = self.state_dict(), {}
        for k, v in big.state_dict().items():
            o = mine.get(source(k))
            copy = k.startswith("blocks.") and n - 1 <= int(k.split(".")[1]) < n - 1 + extra
            if copy and (o is None or o.shape != v.shape):
                state[k] = v  # the last block lacks the context stream's output parts: as a fresh block has them
            else:
                state[k] = mine[source(k)]
        big.load_state_dict(state, strict=True)
        flags = {k: p.requires_grad for k, p in self.named_parameters()}
        for k, p in big.named_parameters():
            p.requires_grad_(flags.get(source(k), True))
        dim = self.cfg.num_heads * self.cfg.head_dim
        for blk in big.blocks[n - 1:n - 1 + extra]:
            for lin, names in ((blk.norm1, DUAL_MOD if blk.dual else IMAGE_MOD),
                               (getattr(blk, "norm1_context", None), IMAGE_MOD)):
                if lin is None:
                    continue
                for j, name in enumerate(names):
                    if name.startswith("gate"):
                        lin.weight[j * dim:(j + 1) * dim] = 0
                        lin.bias[j * dim:(j + 1) * dim] = 0
        big.kernel_backend = self.kernel_backend
        return big

    def field(self, z: torch.Tensor, lr: torch.Tensor | None, t, r=None, context: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None, prompt=None, tangents=None):
        """The velocity field in the model's parametrisation: u(z, r, t) (v when r = t). With ``prediction='x'``
        the network predicts a clean image x and u = (z - x) / max(t, x_t_min) (DESIGN section 4b); one step from
        noise (t = 1, r = 0) then returns x itself. ``'x_lr'``: x = lr + network output.
        ``tangents`` = (tz, tt, tr) returns (u, du) as ``forward`` does."""
        if tangents is None:
            out, tout = self(z, lr, t, r, context, pooled, prompt), None
        else:
            out, tout = self(z, lr, t, r, context, pooled, prompt, tangents=tangents)
        if self.cfg.prediction == "v":
            return out if tangents is None else (out, tout)
        if self.cfg.prediction == "x_lr":
            if lr is None:
                raise ValueError("prediction 'x_lr' needs the LR input")
            out = lr[:, :self.cfg.in_channels] + out
        tt = torch.as_tensor(t, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
        tt = tt.expand(z.shape[0]) if tt.dim() == 0 else tt
        ttc = tt.clamp_min(self.cfg.x_t_min).reshape(-1, 1, 1, 1)
        u = ((z - out) / ttc).to(z.dtype)
        if tangents is None:
            return u
        tz, t_t, _ = tangents
        with torch.no_grad():
            num = (-tout) if tz is None else (tz - tout)
            du = num / ttc
            if t_t is not None:  # d clamp_min(t, m) / dt = 1 where t >= m (PyTorch's convention), else 0
                dt = (t_t.to(ttc.dtype) * (tt >= self.cfg.x_t_min).to(ttc.dtype)).reshape(-1, 1, 1, 1)
                du = du - (z.detach() - out.detach()) * dt / ttc.pow(2)
        return u, du.to(z.dtype)

    @property
    def lr_channels(self) -> int:
        """Channels of the LR stream's input: the codec's, twice for lr_source 'both'."""
        return self.cfg.in_channels * (2 if self.cfg.lr_source == "both" else 1)

    @property
    def needs_restorer(self) -> bool:
        return self.cfg.lr_stream and self.cfg.lr_source in ("restorer", "both")

    def to_flow(self, x: torch.Tensor, lr: torch.Tensor | None) -> torch.Tensor:
        """Codec-space image -> the space the flow runs in: x itself, or (x - base) / residual_scale."""
        k = self.cfg.residual_scale
        return x if k <= 0 else (x - lr[:, :self.cfg.in_channels]) / k

    def from_flow(self, y: torch.Tensor, lr: torch.Tensor | None) -> torch.Tensor:
        """Inverse of ``to_flow``: base + residual_scale y (or y)."""
        k = self.cfg.residual_scale
        return y if k <= 0 else lr[:, :self.cfg.in_channels].to(y.dtype) + k * y

    @property
    def inner_dim(self) -> int:
        return self.cfg.num_heads * self.cfg.head_dim
