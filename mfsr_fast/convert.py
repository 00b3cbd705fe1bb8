"""Weight conversion into MFSRTransformer: the seed of real checkpoint loading.

``from_sd3(model_or_state_dict, config=...)`` maps a diffusers ``SD3Transformer2DModel`` (SD3 / SD3.5: QK RMSNorm,
MMDiT-X dual attention) onto MFSRTransformer. Module names follow diffusers' with these renames:

| diffusers | MFSRTransformer |
| --- | --- |
| pos_embed.proj.* | pos_embed.* (the sin-cos buffer pos_embed.pos_embed is recomputed on the fly) |
| time_text_embed.timestep_embedder.* | time_embed.* |
| time_text_embed.text_embedder.* | pooled_embed.* |
| context_embedder.* | context_embed.* |
| transformer_blocks.N.norm1.linear.* | blocks.N.norm1.* |
| transformer_blocks.N.norm1_context.linear.* | blocks.N.norm1_context.* |
| transformer_blocks.N.attn{,2}.to_out.0.* | blocks.N.attn{,2}.to_out.* |
| transformer_blocks.N.attn.norm_{q,k,added_q,added_k}.weight | same |
| transformer_blocks.N.{ff,ff_context}.net.0.proj.* / net.2.* | blocks.N.{ff,ff_context}.fc1.* / fc2.* |
| norm_out.linear.* | norm_out.* |

The SD3 model has no LR stream and no h = t - r embedder: a converted model either has ``lr_stream=False`` or gets a
fresh DiT4SR LR stream (zero control projections and conv, output projection copied); the h embedder keeps its
zero-initialised last layer, so the result reproduces SD3 exactly for r = t.
"""

from __future__ import annotations

import re

import torch

from mfsr_fast.model import MFSRTransformer

_RENAMES = [
    (r"^pos_embed\.proj\.", "pos_embed."),
    (r"^time_text_embed\.timestep_embedder\.", "time_embed."),
    (r"^time_text_embed\.text_embedder\.", "pooled_embed."),
    (r"^context_embedder\.", "context_embed."),
    (r"^transformer_blocks\.", "blocks."),
    (r"\.norm1\.linear\.", ".norm1."),
    (r"\.norm1_context\.linear\.", ".norm1_context."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.net\.0\.proj\.", ".fc1."),
    (r"\.net\.2\.", ".fc2."),
    (r"^norm_out\.linear\.", "norm_out."),
]
_DROP = {"pos_embed.pos_embed"}


def config_from_sd3(sd3_config: dict, **overrides) -> dict:
    """MFSRTransformer config keys from a diffusers SD3Transformer2DModel config."""
    c = dict(sd3_config)
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("caption_projection_dim", inner) != inner:
        raise ValueError(f"caption_projection_dim {c['caption_projection_dim']} != inner dim {inner}: unsupported")
    if c.get("out_channels") not in (None, c["in_channels"]):
        raise ValueError("out_channels must equal in_channels: MFSRTransformer predicts a velocity of z's shape")
    cfg = dict(
        in_channels=c["in_channels"], patch_size=c["patch_size"], num_layers=c["num_layers"],
        num_heads=c["num_attention_heads"], head_dim=c["attention_head_dim"],
        context_dim=c["joint_attention_dim"], pooled_dim=c["pooled_projection_dim"],
        sample_size=c["sample_size"], pos_embed_max_size=c["pos_embed_max_size"],
        dual_attention_layers=tuple(c.get("dual_attention_layers") or ()), qk_norm=c.get("qk_norm"),
    )
    cfg.update(overrides)
    return cfg


def rename_sd3_key(key: str) -> str | None:
    if key in _DROP:
        return None
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def convert_sd3_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers SD3Transformer2DModel state dict to MFSRTransformer keys (no LR-stream or h keys).

    The last block's context queries (attn.add_q_proj, attn.norm_added_q) are dropped: that block discards the
    context outputs, so SD3 computes them for nothing and MFSRTransformer does not have them.
    """
    blocks = [int(m.group(1)) for k in state_dict if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
    last = max(blocks, default=-1)
    dead = re.compile(rf"^transformer_blocks\.{last}\.attn\.(add_q_proj|norm_added_q)\.")
    out = {}
    for k, v in state_dict.items():
        nk = None if dead.match(k) else rename_sd3_key(k)
        if nk is not None:
            out[nk] = v
    return out


def from_sd3(sd3, *, lr_stream: bool = False, **overrides) -> MFSRTransformer:
    """Build an MFSRTransformer from a diffusers SD3Transformer2DModel (or a (config, state_dict) pair).

    Strict: every SD3 weight must land, and the only MFSRTransformer weights left unset are the h embedder and,
    with ``lr_stream=True``, the fresh DiT4SR LR stream. Anything else is reported as a ValueError.
    """
    if isinstance(sd3, tuple):
        sd3_config, state_dict = sd3
    else:
        sd3_config, state_dict = dict(sd3.config), sd3.state_dict()
    model = MFSRTransformer(**config_from_sd3(sd3_config, lr_stream=lr_stream, **overrides))
    converted = convert_sd3_state_dict(state_dict)
    expected = model.state_dict()
    unexpected = sorted(set(converted) - set(expected))
    fresh = re.compile(r"^h_embed\.|_control\.|\.control_conv\.")
    missing = sorted(k for k in set(expected) - set(converted) if not fresh.search(k))
    mismatched = sorted(k for k in set(converted) & set(expected) if converted[k].shape != expected[k].shape)
    if unexpected or missing or mismatched:
        raise ValueError("SD3 -> MFSRTransformer conversion failed:\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  shape mismatches ({len(mismatched)}): {mismatched[:20]}")
    model.load_state_dict(converted, strict=False)
    if lr_stream:
        # DiT4SR: the LR output projections start as copies of the (now loaded) image projections.
        for blk in model.blocks:
            MFSRTransformer.zero_init_lr_stream(blk)
    dtype = next(iter(state_dict.values())).dtype
    return model if dtype == torch.float32 else model.to(dtype)
