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
  restorer (Real-ESRGAN x4plus, ``mfsr_fast.restorer``), instead of (or before) the bicubic-upsampled LR, and the
  flow may run over the scaled residual y = (x - R(LR)) / residual_scale (``to_flow`` / ``from_flow``), so that a
  zero network output is R(LR) itself and the model only learns what R lacks.

Forward-mode tangents: ``forward(..., tangents=(tz, tt, tr))`` also returns du along them, computed layer by layer
by explicit formulas in the same call (MeanFlow's target without torch.func.jvp; tests/test_model_jvp.py).

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
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import kernels


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
    restorer: str = ""  # the restorer's name or folder (mfsr_fast.restorer.resolve_restorer)
    # > 0: the flow runs over the scaled residual y = (x - base) / residual_scale instead of x, so noise at t = 1 is
    # the base image plus residual_scale e, and a zero output (prediction "x") is the base image itself.
    residual_scale: float = 0.0
    # Multi-step sampling grid (``meanflow.time_grid``): 0 gives the uniform grid 1, (N-1)/N, ..., 0; a value in
    # (0, 1) makes the first jump go from t = 1 to refine_t and the other N - 1 steps split [refine_t, 0] evenly, so
    # steps 2..N refine the one-step image from a little noise instead of re-entering mid t.
    refine_t: float = 0.0
    # > 0: a convolutional head that sees across patches. The read-out gives each model-space pixel ``conv_head``
    # feature channels beside its output; two 3 x 3 convolutions over both add a correction to the output (the
    # second zero-initialised). A linear read-out per token alone leaves a step at every patch edge (the patch grid
    # of RESULTS.md); the head can remove it. 0: the linear read-out only (SD3 / DiT4SR).
    conv_head: int = 0


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
    # 1 / residual_scale (0.25; 0.1 did worse in training.diagnose, RESULTS.md), and the network predicts that
    # residual (zero: exactly R(LR)).
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


# Explicit tangents (forward-mode derivatives) of the model's layers, for ``forward(..., tangents=...)``. Tangents
# are detached and computed without autograd (MeanFlow consumes them under stop-gradient); None stands for zero.
@torch.no_grad()
def _t_linear(lin: nn.Linear, t: torch.Tensor | None) -> torch.Tensor | None:
    """W t: a linear layer's tangent (the bias has none)."""
    return None if t is None else F.linear(t, lin.weight)


@torch.no_grad()
def _t_silu(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.ops.aten.silu_backward(t, x.detach())


@torch.no_grad()
def _t_add(*ts: torch.Tensor | None) -> torch.Tensor | None:
    ts = [t for t in ts if t is not None]
    return sum(ts[1:], ts[0]) if ts else None


def _cat_tangents(pairs) -> torch.Tensor | None:
    """Concatenate the tangents of (primal, tangent) pairs along dim 2, zeros for None; None if all are None."""
    if all(t is None for _, t in pairs):
        return None
    with torch.no_grad():
        ts = [torch.zeros_like(p) if t is None else t for p, t in pairs]
        return torch.cat(ts, dim=2) if len(ts) > 1 else ts[0]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))

    def forward_with_tangent(self, x: torch.Tensor, t: torch.Tensor | None):
        h = self.linear_1(x)
        return self.linear_2(F.silu(h)), _t_linear(self.linear_2, _t_silu(h, _t_linear(self.linear_1, t)))


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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.cfg.num_heads, self.cfg.head_dim)).transpose(1, 2)  # (B, H, L, Dh)

    def _norm(self, norm, x):
        return x if norm is None else norm(x)

    def _proj(self, lins, norm, x, t, jvp: bool):
        """Linears (one after another), heads, optional RMSNorm: (primal, tangent or None)."""
        for lin in lins:
            x, t = lin(x), (_t_linear(lin, t) if jvp else None)
        x, t = self._heads(x), (self._heads(t) if t is not None else None)
        if norm is None:
            return x, t
        return norm(x), (norm.tangent(x, t) if jvp else None)

    def forward(self, x: torch.Tensor, n_img: int, c: torch.Tensor | None = None, backend: str = "auto",
                tx: torch.Tensor | None = None, tc: torch.Tensor | None = None, jvp: bool = False):
        """x: (B, N [+ N_lr], D) image tokens, the first n_img from z; c: (B, Lc, D) context or None.
        Returns (out_img, out_ctx); with ``jvp``, also their tangents for the input tangents tx, tc (None = zero)."""
        x_img, x_lr = x[:, :n_img], x[:, n_img:]  # (B, N, D), (B, N_lr, D)
        tx_img, tx_lr = (tx[:, :n_img], tx[:, n_img:]) if tx is not None else (None, None)
        q_img, tq_img = self._proj([self.to_q], self.norm_q, x_img, tx_img, jvp)  # (B, H, N, Dh)
        k_img_n, tk_img_n = self._proj([self.to_k], self.norm_k, x_img, tx_img, jvp)
        v_img, tv_img = self._proj([self.to_v], None, x_img, tx_img, jvp)
        qs, ks, vs = [(q_img, tq_img)], [(k_img_n, tk_img_n)], [(v_img, tv_img)]
        if x_lr.shape[1]:
            # DiT4SR: control projections applied after the shared image projections.
            qs.append(self._proj([self.to_q, self.to_q_control], self.norm_q, x_lr, tx_lr, jvp))
            if self.cfg.dit4sr_norm_k_bug:
                # Released DiT4SR: key_control = norm_k(key) after key = norm_k(key): image keys normalised twice.
                ks.append((self._norm(self.norm_k, k_img_n),
                           self.norm_k.tangent(k_img_n, tk_img_n) if jvp and self.norm_k is not None else tk_img_n))
            else:
                ks.append(self._proj([self.to_k, self.to_k_control], self.norm_k, x_lr, tx_lr, jvp))
            vs.append(self._proj([self.to_v, self.to_v_control], None, x_lr, tx_lr, jvp))
        if c is not None:
            if self.context_out:
                qs.append(self._proj([self.add_q_proj], self.norm_added_q, c, tc, jvp))  # (B, H, Lc, Dh)
            ks.append(self._proj([self.add_k_proj], self.norm_added_k, c, tc, jvp))
            vs.append(self._proj([self.add_v_proj], None, c, tc, jvp))
        q, k, v = (torch.cat([p for p, _ in t], dim=2) if len(t) > 1 else t[0][0]
                   for t in (qs, ks, vs))  # (B, H, Lq | L, Dh)
        if jvp:
            tq, tk, tv = (_cat_tangents(t) for t in (qs, ks, vs))
            o, to = kernels.attention_with_tangent(q, k, v, tq, tk, tv, backend=backend)  # (B, H, Lq, Dh)
            to = to.transpose(1, 2).flatten(2)  # (B, L, D)
        else:
            o, to = kernels.attention(q, k, v, backend=backend), None  # (B, H, Lq, Dh)
        o = o.transpose(1, 2).flatten(2)  # (B, L, D)
        n_x = x.shape[1]
        out_img = self.to_out(o[:, :n_img])  # (B, N, D)
        t_img = _t_linear(self.to_out, to[:, :n_img]) if jvp else None
        if x_lr.shape[1]:
            o_lr = o[:, n_img:n_x]  # (B, N_lr, D)
            to_lr = to[:, n_img:n_x] if jvp else None
            if self.cfg.lr_attn_residual:
                o_lr = o_lr + x_lr
                to_lr = _t_add(to_lr, tx_lr) if jvp else None
            out_img = torch.cat([out_img, self.to_out_control(o_lr)], dim=1)  # (B, N + N_lr, D)
            if jvp:
                t_img = torch.cat([t_img, _t_linear(self.to_out_control, to_lr)], dim=1)
        out_ctx = t_ctx = None
        if c is not None and self.context_out:
            out_ctx = self.to_add_out(o[:, n_x:])  # (B, Lc, D)
            t_ctx = _t_linear(self.to_add_out, to[:, n_x:]) if jvp else None
        if jvp:
            return out_img, out_ctx, t_img, t_ctx
        return out_img, out_ctx


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

    def forward(self, x: torch.Tensor, n_img: int, grid: tuple[int, int], tx: torch.Tensor | None = None,
                jvp: bool = False):
        """(B, L, D) -> (B, L, D); with ``jvp``, (out, tangent) for the input tangent tx (None = zero)."""
        h = self.fc1(x)
        a = F.gelu(h, approximate="tanh")  # (B, L, 4D)
        ta = None
        if jvp and tx is not None:
            with torch.no_grad():
                ta = torch.ops.aten.gelu_backward(_t_linear(self.fc1, tx), h.detach(), approximate="tanh")
        if self.control_conv is not None and x.shape[1] > n_img:
            a_img, a_lr = a[:, :n_img], a[:, n_img:]  # (B, N, 4D) each
            lr_map = a_lr.transpose(1, 2).unflatten(2, grid)  # (B, 4D, Hp, Wp)
            cross = self.control_conv(lr_map).flatten(2).transpose(1, 2)  # (B, N, 4D)
            a = torch.cat([a_img + self.lr_conv_scale * cross, a_lr], dim=1)  # (B, 2N, 4D)
            if ta is not None:
                with torch.no_grad():
                    conv = self.control_conv
                    t_map = ta[:, n_img:].transpose(1, 2).unflatten(2, grid)
                    t_cross = F.conv2d(t_map, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                       conv.groups).flatten(2).transpose(1, 2)
                    ta = torch.cat([ta[:, :n_img] + self.lr_conv_scale * t_cross, ta[:, n_img:]], dim=1)
        out = self.fc2(a)  # (B, L, D)
        return (out, _t_linear(self.fc2, ta)) if jvp else out


class JointBlock(nn.Module):
    """One MM-DiT block: adaLN-Zero modulation, joint attention, optional image-only attention, feed-forward."""

    def __init__(self, cfg: MFSRConfig, dual: bool, last: bool):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        self.cfg, self.dual, self.last = cfg, dual, last
        has_ctx = cfg.context_dim > 0
        # Image modulation: shift/scale/gate for attention and MLP (+ shift/scale/gate for the second attention).
        self.norm1 = nn.Linear(dim, (9 if dual else 6) * dim)
        self.attn = Attention(cfg, context=has_ctx, context_out=not last)
        self.attn2 = Attention(cfg, context=False, context_out=False) if dual else None
        self.ff = FeedForward(cfg, lr_conv=cfg.lr_stream)
        if has_ctx:
            # The last block only feeds the context into attention (SD3's context_pre_only): scale/shift only.
            self.norm1_context = nn.Linear(dim, (2 if last else 6) * dim)
            self.ff_context = None if last else FeedForward(dataclasses.replace(cfg, lr_stream=False), lr_conv=False)

    def forward(self, x, c, temb, n_img: int, grid: tuple[int, int], backend: str = "auto", tangents=None):
        """x: (B, N [+ N_lr], D), c: (B, Lc, D) or None, temb: (B, D) -> updated (x, c).
        ``tangents`` = (tx, tc, ttemb) (each may be None = zero) -> (x, c, (tx, tc)): the explicit JVP pass, the same
        primal ops, each followed by its tangent (DESIGN section 3's du/dt without torch.func.jvp)."""
        jvp = tangents is not None
        tx, tc, ttemb = tangents if jvp else (None, None, None)
        eps = self.cfg.eps
        n_mod = 9 if self.dual else 6
        st = F.silu(temb)
        tst = _t_silu(temb, ttemb)
        # Image modulation chunks: shift/scale/gate (attention), shift/scale/gate (MLP) [, shift/scale/gate (attn2)].
        mod = self.norm1(st).chunk(n_mod, dim=1)  # each (B, D)
        tmod = _t_linear(self.norm1, tst).chunk(n_mod, dim=1) if tst is not None else (None,) * n_mod

        def ada(x_, shift, scale, gate=None, h=None, tx_=None, tshift=None, tscale=None, tgate=None, th=None):
            """adaLN modulation -> (outputs, tangents); tangents are None (pairs of None with h) without jvp."""
            if jvp:
                return kernels.adaln_modulate_with_tangent(x_, shift, scale, gate=gate, h=h, tx=tx_, tshift=tshift,
                                                           tscale=tscale, tgate=tgate, th=th, eps=eps,
                                                           backend=backend)
            out = kernels.adaln_modulate(x_, shift, scale, gate=gate, h=h, eps=eps, backend=backend)
            return out, (None if h is None else (None, None))

        @torch.no_grad()
        def t_gated(t_base, t_gate, h, gate, t_h):
            """Tangent of base + gate * h."""
            return _t_add(t_base, t_gate[:, None] * h.detach() if t_gate is not None else None,
                          gate.detach()[:, None] * t_h if t_h is not None else None)

        y, ty = ada(x, mod[0], mod[1], tx_=tx, tshift=tmod[0], tscale=tmod[1])  # (B, N, D)
        if self.dual:
            # MMDiT-X: a second modulation of the same normalised input feeds the image-only attention.
            y2, ty2 = ada(x, mod[6], mod[7], tx_=tx, tshift=tmod[6], tscale=tmod[7])
        yc = tyc = None
        if c is not None:
            n_c = 2 if self.last else 6
            cmod = self.norm1_context(st).chunk(n_c, dim=1)
            tcmod = _t_linear(self.norm1_context, tst).chunk(n_c, dim=1) if tst is not None else (None,) * n_c
            if self.last:  # AdaLayerNormContinuous order: scale first
                yc, tyc = ada(c, cmod[1], cmod[0], tx_=tc, tshift=tcmod[1], tscale=tcmod[0])  # (B, Lc, D)
            else:
                yc, tyc = ada(c, cmod[0], cmod[1], tx_=tc, tshift=tcmod[0], tscale=tcmod[1])

        out = self.attn(y, n_img, yc, backend=backend, tx=ty, tc=tyc, jvp=jvp)
        a, ac, ta, tac = out if jvp else (*out, None, None)  # (B, N, D), (B, Lc, D) or None
        if self.dual:
            tx = t_gated(tx, tmod[2], a, mod[2], ta) if jvp else None
            x = x + mod[2][:, None] * a  # (B, N, D)
            out = self.attn2(y2, n_img, None, backend=backend, tx=ty2, jvp=jvp)
            a2, ta2 = (out[0], out[2]) if jvp else (out[0], None)
            (x, y), (tx, ty) = ada(x, mod[3], mod[4], gate=mod[8], h=a2, tx_=tx, tshift=tmod[3], tscale=tmod[4],
                                   tgate=tmod[8], th=ta2)
        else:
            (x, y), (tx, ty) = ada(x, mod[3], mod[4], gate=mod[2], h=a, tx_=tx, tshift=tmod[3], tscale=tmod[4],
                                   tgate=tmod[2], th=ta)
        f, tf = self.ff(y, n_img, grid, tx=ty, jvp=True) if jvp else (self.ff(y, n_img, grid), None)
        tx = t_gated(tx, tmod[5], f, mod[5], tf) if jvp else None
        x = x + mod[5][:, None] * f  # (B, N, D)

        if c is not None and not self.last:
            (c, yc), (tc, tyc) = ada(c, cmod[3], cmod[4], gate=cmod[2], h=ac, tx_=tc, tshift=tcmod[3],
                                     tscale=tcmod[4], tgate=tcmod[2], th=tac)
            if jvp:
                fc, tfc = self.ff_context(yc, yc.shape[1], (0, 0), tx=tyc, jvp=True)
                tc = t_gated(tc, tcmod[5], fc, cmod[5], tfc)
            else:
                fc = self.ff_context(yc, yc.shape[1], (0, 0))
            c = c + cmod[5][:, None] * fc  # (B, Lc, D)
        elif self.last:
            c = tc = None
        return (x, c, (tx, tc)) if jvp else (x, c)


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
        refine_t: float = 0.0,
        conv_head: int = 0,
    ):
        # Keyword arguments mirror MFSRConfig field by field: diffusers' ConfigMixin reads the signature.
        super().__init__()
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        kwargs["dual_attention_layers"] = tuple(int(i) for i in dual_attention_layers)
        cfg = MFSRConfig(**kwargs)
        _check_config(cfg)
        self.cfg = cfg
        self.kernel_backend = "auto"
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
        self.initialize_weights()

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
        (no torch.func.jvp: works through DDP and FSDP wrappers and costs far less host time); equal to
        ``torch.func.jvp`` of the same call within rounding (tests/test_model_jvp.py)."""
        cfg = self.cfg
        jvp = tangents is not None
        if jvp and (not isinstance(tangents, (tuple, list)) or len(tangents) != 3):
            raise ValueError("tangents must be a tuple (tz, tt, tr), each a tensor or None")
        if prompt is not None:
            if context is not None or pooled is not None:
                raise ValueError("pass either prompt or context/pooled, not both")
            context, pooled = self.prompt(prompt, z.shape[0] if isinstance(z, torch.Tensor) else None)
        t, r = self._check_inputs(z, lr, t, r, context, pooled)
        B, C, H, W = z.shape
        tz, tt, tr = tangents if jvp else (None, None, None)
        if tz is not None and tz.shape != z.shape:
            raise ValueError(f"the tangent of z must have z's shape {tuple(z.shape)}, got {_describe(tz)}")
        for name, tan in (("t", tt), ("r", tr)):
            if tan is not None and (not isinstance(tan, torch.Tensor) or tan.shape != (B,)):
                raise ValueError(f"the tangent of {name} must be a (B,) = ({B},) tensor, got {_describe(tan)}")
        p = cfg.patch_size
        hp, wp = H // p, W // p
        backend = self.kernel_backend
        dtype = z.dtype

        pos = sincos_pos_embed(self.inner_dim, hp, wp, cfg.pos_embed_max_size, cfg.sample_size // p,
                               device=z.device).to(dtype)  # (N, D)
        x = self.pos_embed(z).flatten(2).transpose(1, 2) + pos  # (B, N, D)
        with torch.no_grad():
            tx = None if tz is None else F.conv2d(tz.to(dtype), self.pos_embed.weight, None,
                                                  self.pos_embed.stride).flatten(2).transpose(1, 2)
        n_img = x.shape[1]
        if lr is not None:
            x_lr = self.pos_embed(lr[:, :C]).flatten(2).transpose(1, 2) + pos  # (B, N, D)
            if self.lr_embed_extra is not None:
                x_lr = x_lr + self.lr_embed_extra(lr[:, C:]).flatten(2).transpose(1, 2)  # (B, N, D)
            x = torch.cat([x, x_lr], dim=1)  # (B, 2N, D)
            if tx is not None:
                tx = torch.cat([tx, torch.zeros_like(x_lr)], dim=1)

        # Dual time conditioning: embed t and h = t - r, add the pooled projection.
        s_t, s_h = t * cfg.timestep_scale, (t - r) * cfg.timestep_scale
        with torch.no_grad():
            ts_t = None if tt is None else tt * cfg.timestep_scale
            ts_h = _t_add(tt, None if tr is None else -tr)
            ts_h = None if ts_h is None else ts_h * cfg.timestep_scale
            te_t = None if ts_t is None else timestep_embedding_tangent(s_t, ts_t, cfg.time_freq_dim).to(dtype)
            te_h = None if ts_h is None else timestep_embedding_tangent(s_h, ts_h, cfg.time_freq_dim).to(dtype)
        temb, ttemb = self.time_embed.forward_with_tangent(
            timestep_embedding(s_t, cfg.time_freq_dim).to(dtype), te_t)  # (B, D)
        hemb, themb = self.h_embed.forward_with_tangent(timestep_embedding(s_h, cfg.time_freq_dim).to(dtype), te_h)
        temb = temb + hemb
        ttemb = _t_add(ttemb, themb)
        if self.pooled_embed is not None:
            if pooled is None:
                pooled = z.new_zeros(B, cfg.pooled_dim)
            temb = temb + self.pooled_embed(pooled)  # (B, D)
        c = self.context_embed(context) if context is not None else None  # (B, Lc, D)
        tc = None

        for blk in self.blocks:
            if jvp:
                x, c, (tx, tc) = blk(x, c, temb, n_img, (hp, wp), backend=backend, tangents=(tx, tc, ttemb))
            else:
                x, c = blk(x, c, temb, n_img, (hp, wp), backend=backend)

        x = x[:, :n_img]  # (B, N, D): only the noisy-latent tokens are decoded
        scale, shift = self.norm_out(F.silu(temb)).chunk(2, dim=1)  # (B, D) each
        if jvp:
            tx = tx[:, :n_img] if tx is not None else None
            tst = _t_silu(temb, ttemb)
            tscale, tshift = _t_linear(self.norm_out, tst).chunk(2, dim=1) if tst is not None else (None, None)
            x, tx = kernels.adaln_modulate_with_tangent(x, shift, scale, tx=tx, tshift=tshift, tscale=tscale,
                                                        eps=cfg.eps, backend=backend)  # (B, N, D)
            tx = _t_linear(self.proj_out, tx)
        else:
            x = kernels.adaln_modulate(x, shift, scale, eps=cfg.eps, backend=backend)  # (B, N, D)
        x = self.proj_out(x)  # (B, N, p * p * (C + conv_head))
        Co = C + cfg.conv_head

        def unpatch(a):  # (B, N, p * p * Co) -> (B, Co, H, W)
            return a.reshape(B, hp, wp, p, p, Co).permute(0, 5, 1, 3, 2, 4).reshape(B, Co, H, W)
        out = unpatch(x)
        tout = None if not jvp else unpatch(torch.zeros_like(x) if tx is None else tx)
        if self.head_conv1 is not None:
            out, tout = self._conv_head(out, tout)
        return out if not jvp else (out, tout)

    def _conv_head(self, o: torch.Tensor, to: torch.Tensor | None):
        """(B, C + conv_head, H, W) read-out -> (B, C, H, W): o[:, :C] + conv2(silu(conv1(o))), and its tangent."""
        C = self.cfg.in_channels
        a = self.head_conv1(o)
        out = o[:, :C] + self.head_conv2(F.silu(a))
        if to is None:
            return out, None
        with torch.no_grad():
            ta = F.conv2d(to, self.head_conv1.weight, None, padding=1)
            tout = to[:, :C] + F.conv2d(_t_silu(a, ta), self.head_conv2.weight, None, padding=1)
        return out, tout

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
        """Store fixed prompt embeddings in the model (e.g. from ``mfsr_fast.prompts``): ``context`` (3, L, context_dim)
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

    def _check_inputs(self, z, lr, t, r, context, pooled):
        """Clear ValueErrors for a caller's mistakes, before anything deep can fail."""
        cfg = self.cfg
        param = self.pos_embed.weight
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z must be a (B, C, H, W) tensor, got {_describe(z)}")
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
                raise ValueError(f"lr must be a (B, C, H, W) tensor, got {_describe(lr)}")
            if lr.shape[2:] != z.shape[2:]:
                raise ValueError(f"lr spatial size {tuple(lr.shape[2:])} differs from z's {tuple(z.shape[2:])}; "
                                 "upsample the LR image to the output size before encoding")
            if lr.shape[0] != B or lr.shape[1] != self.lr_channels:
                raise ValueError(f"lr shape {tuple(lr.shape)} does not match z {tuple(z.shape)}: expected {B} "
                                 f"images of {self.lr_channels} channels (lr_source {cfg.lr_source!r})")
            if lr.dtype != z.dtype or lr.device != z.device:
                raise ValueError(f"lr ({lr.dtype}, {lr.device}) must match z ({z.dtype}, {z.device})")
        elif lr is not None:
            raise ValueError("this model has no LR stream (lr_stream=False): pass lr=None")
        t = self._check_time(t, "t", B, z)
        r = t if r is None else self._check_time(r, "r", B, z)
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
                raise ValueError(f"context must be (B={B}, L, {cfg.context_dim}), got {_describe(context)}")
            if context.dtype != z.dtype or context.device != z.device:
                raise ValueError(f"context ({context.dtype}, {context.device}) must match z ({z.dtype}, {z.device})")
        if pooled is not None:
            if cfg.pooled_dim == 0:
                raise ValueError("this model has no pooled projection (pooled_dim=0): pass pooled=None")
            if not isinstance(pooled, torch.Tensor) or pooled.shape != (B, cfg.pooled_dim):
                raise ValueError(f"pooled must be (B={B}, {cfg.pooled_dim}), got {_describe(pooled)}")
            if pooled.dtype != z.dtype or pooled.device != z.device:
                raise ValueError(f"pooled ({pooled.dtype}, {pooled.device}) must match z ({z.dtype}, {z.device})")
        return t, r

    @staticmethod
    def _check_time(t, name: str, B: int, z: torch.Tensor) -> torch.Tensor:
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


def _check_config(cfg: MFSRConfig) -> None:
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
    if not 0.0 <= cfg.refine_t < 1.0:
        raise ValueError(f"refine_t must be in [0, 1), got {cfg.refine_t}")
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


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
