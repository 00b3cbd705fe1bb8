"""Real checkpoints into MFSRTransformer: SD3 / SD3.5 transformers and DiT4SR-format teachers.

``load_transformer(folder)`` reads a diffusers-layout folder (config.json + safetensors, single or sharded, or a
``.bin`` read with ``weights_only=True``) without building the diffusers model, and returns the MFSRTransformer with a
``LoadReport``:
- an MFSRTransformer folder (our own ``save_pretrained``) loads as it is;
- a DiT4SR-format folder (SD3Transformer2DModel keys plus ``*_control`` projections and ``ff.control_conv``) loads
  strictly: every key must land, and the report lists missing, unexpected and mis-shaped keys. The released DiT4SR
  code computes the LR keys from the normalised image keys (DESIGN section 4), so ``dit4sr_norm_k_bug`` defaults to
  on for these weights; DiT4SR's second attentions carry context projections that its forward never uses, and these
  are skipped (counted in the report);
- a plain SD3 / SD3.5 transformer gives a teacher with a fresh DiT4SR LR stream (zero control layers, output
  projections copied) unless ``lr_stream=False``.
The h = t - r embedder is always fresh (its last layer zero), so the result is the teacher exactly when r = t.
Weights are assigned from a meta-device model, so a 2.5B-parameter checkpoint is held once in memory, in its own
dtype (or ``dtype``).

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

import json
import os
import re
from dataclasses import dataclass, field

import torch
from diffusers.utils import logging as dlogging
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mfsr_fast.models.transformer import MFSRTransformer

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


# Folders of real checkpoints.

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_BIN_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# DiT4SR builds its second attentions with context projections that its forward never calls.
_DIT4SR_DEAD = re.compile(r"^transformer_blocks\.\d+\.attn2\.(add_q_proj|add_k_proj|add_v_proj|to_add_out|"
                          r"norm_added_q|norm_added_k)\.")
_CONTROL = re.compile(r"_control\.|\.control_conv\.")


@dataclass
class LoadReport:
    """What ``load_transformer`` found and did."""

    path: str
    format: str  # "mfsr" | "dit4sr" | "sd3"
    loaded: int = 0  # tensors loaded from the checkpoint
    fresh: list[str] = field(default_factory=list)  # parameters initialised here (h embedder, a fresh LR stream)
    skipped: list[str] = field(default_factory=list)  # checkpoint tensors its own forward never uses
    dit4sr_norm_k_bug: bool = False
    lr_conv_scale: float = 1.2

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format} checkpoint, {self.loaded} tensors loaded"]
        if self.fresh:
            groups = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", k).rsplit(".", 1)[0] for k in self.fresh})
            lines.append(f"  fresh ({len(self.fresh)} tensors): {', '.join(groups)}")
        if self.skipped:
            lines.append(f"  skipped as unused by the checkpoint's own forward: {len(self.skipped)} tensors")
        if self.format == "dit4sr":
            how = ("LR keys from the normalised image keys, as the released DiT4SR code" if self.dit4sr_norm_k_bug
                   else "LR keys from their own control projections")
            lines.append(f"  dit4sr_norm_k_bug={self.dit4sr_norm_k_bug} ({how}), lr_conv_scale={self.lr_conv_scale}")
        return "\n".join(lines)


def _model_folder(path) -> str:
    """The folder holding config.json: ``path`` itself or a pipeline folder's ``transformer/``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"checkpoint {path!r}: no config.json (expected a diffusers model folder)")
    return path


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers-layout model folder: safetensors (single or sharded), or a ``.bin`` read with
    ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return load_file(os.path.join(path, name))
    for name in _INDEX_FILES:
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(load_file(os.path.join(path, shard)))
            return sd
    for name in _BIN_FILES:
        if os.path.isfile(os.path.join(path, name)):
            try:
                return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as e:  # weights_only refuses pickled code: say so instead of a deep traceback
                raise ValueError(f"{os.path.join(path, name)}: not a plain tensor file ({e}); convert it to "
                                 "safetensors") from None
    raise ValueError(f"checkpoint {path!r}: no weights (looked for {', '.join(_WEIGHT_FILES + _INDEX_FILES)}, "
                     f"{', '.join(_BIN_FILES)})")


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers-layout model folder. Safetensors (single or sharded) are preferred; a
    ``.bin`` is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    folder = _model_folder(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config, read_weights(folder)


def _stored_keys(folder: str) -> set[str] | None:
    """The tensor names a folder's safetensors hold (single or sharded), from their headers; None without them."""
    files = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))][:1]
    for name in _INDEX_FILES if not files else ():
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    if not files:
        return None
    keys: set[str] = set()
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what is wrong (torch's state-dict errors open with a title)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else type(e).__name__)
    return line if len(line) <= 240 else line[:237] + "..."


def load_mfsr(folder: str, dtype: torch.dtype | None = None) -> MFSRTransformer:
    """An MFSRTransformer folder (``save_pretrained``) with every fault of the folder as one ``ValueError`` naming
    it: a config.json this package cannot build from, damaged weights, tensors missing (diffusers would initialise
    them afresh with a log line), of the wrong shape, or holding NaN or infinity."""
    quiet = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # missing tensors are refused below, not announced as freshly initialised
    try:
        stored = _stored_keys(folder)
        model = MFSRTransformer.from_pretrained(folder, low_cpu_mem_usage=False, torch_dtype=dtype)
    except (TypeError, KeyError) as e:
        raise ValueError(f"model {folder!r}: its config.json does not describe a model this package builds "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"model {folder!r}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        dlogging.set_verbosity(quiet)
    state = model.state_dict()
    missing = sorted(set(state) - stored) if stored is not None else []
    if missing:
        raise ValueError(f"model {folder!r}: its weights lack {len(missing)} tensor(s) the model needs "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): damaged or not this "
                         "model's weights")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"model {folder!r}: weights hold NaN or infinity ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the model would write black or noise")
    return model


def load_transformer(path: str, *, lr_stream: bool = True, dit4sr_norm_k_bug: bool | None = None,
                     lr_conv_scale: float | None = None, dtype: torch.dtype | None = None, seed: int = 0,
                     **overrides) -> tuple[MFSRTransformer, LoadReport]:
    """An MFSRTransformer from a folder: our own, DiT4SR-format or plain SD3 / SD3.5 (see the module docstring).

    ``dit4sr_norm_k_bug``: None keeps the checkpoint's behaviour (on for DiT4SR weights). ``lr_conv_scale``: the
    weight of the LR stream's conv (DESIGN: 1.2; set it to what the checkpoint was trained with). ``seed`` fixes the
    fresh h embedder's random first layer. Raises ValueError with the key report when the weights do not fit.
    """
    folder = _model_folder(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    cls = config.get("_class_name", "")
    if cls == "MFSRTransformer":
        model = load_mfsr(folder, dtype)
        return model, LoadReport(os.fspath(path), "mfsr", loaded=len(model.state_dict()),
                                 dit4sr_norm_k_bug=model.cfg.dit4sr_norm_k_bug, lr_conv_scale=model.cfg.lr_conv_scale)
    if "num_attention_heads" not in config or "joint_attention_dim" not in config:
        raise ValueError(f"checkpoint {path!r}: config.json is neither an MFSRTransformer nor an SD3 transformer "
                         f"(_class_name {cls!r})")
    sd = read_weights(folder)
    dit4sr = any(_CONTROL.search(k) for k in sd)
    fmt = "dit4sr" if dit4sr else "sd3"
    skipped = sorted(k for k in sd if dit4sr and _DIT4SR_DEAD.match(k))
    for k in skipped:
        del sd[k]
    state = convert_sd3_state_dict(sd)
    del sd
    extra = {}
    if dit4sr:
        extra["dit4sr_norm_k_bug"] = True if dit4sr_norm_k_bug is None else dit4sr_norm_k_bug
    elif dit4sr_norm_k_bug:
        extra["dit4sr_norm_k_bug"] = True
    if lr_conv_scale is not None:
        extra["lr_conv_scale"] = lr_conv_scale
    cfg = config_from_sd3(config, lr_stream=lr_stream or dit4sr, **extra, **overrides)
    with torch.device("meta"):
        model = MFSRTransformer(**cfg)
    expected = model.state_dict()
    fresh_re = re.compile(r"^h_embed\.") if dit4sr else re.compile(r"^h_embed\.|_control\.|\.control_conv\.")
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not fresh_re.search(k))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or mismatched:
        raise ValueError(f"{path}: the {fmt} checkpoint does not fit MFSRTransformer({_brief(cfg)}):\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
                         f"  shape mismatches ({len(mismatched)}): {mismatched[:20]}")
    dt = dtype or next(iter(state.values())).dtype
    n_loaded = len(state)
    for k in list(state):  # one tensor at a time, so a dtype change never holds two copies of the model
        state[k] = state[k].to(dt)
    model.load_state_dict(state, strict=False, assign=True)
    fresh = sorted(set(expected) - set(state))
    del state
    _materialize_fresh(model, dt, torch.Generator().manual_seed(seed))
    report = LoadReport(os.fspath(path), fmt, loaded=n_loaded, fresh=fresh, skipped=skipped,
                        dit4sr_norm_k_bug=model.cfg.dit4sr_norm_k_bug, lr_conv_scale=model.cfg.lr_conv_scale)
    return model, report


def _brief(cfg: dict) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in ("num_layers", "num_heads", "head_dim", "in_channels", "context_dim"))


@torch.no_grad()
def _materialize_fresh(model: MFSRTransformer, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Give the parameters the checkpoint did not hold (still on the meta device) their initial values: the h
    embedder as in ``initialize_weights`` and, for a fresh LR stream, DiT4SR's zero / copied init."""
    owners = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.is_meta})
    odd = [n for n in owners if not (n.startswith("h_embed.") or _CONTROL.search(n + "."))]
    if odd:
        raise RuntimeError(f"parameters of {odd} are neither in the checkpoint nor fresh by design")
    for name in owners:
        mod = model.get_submodule(name)
        mod.to_empty(device="cpu", recurse=False)
        for p in mod.parameters(recurse=False):
            p.data = torch.zeros(p.shape, dtype=dtype)
    if "h_embed.linear_1" in owners:  # MeanFlow: a small random first layer, a zero last layer
        w = model.h_embed.linear_1.weight
        w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    for name in owners:
        if name.endswith(".to_out_control"):  # DiT4SR: the LR output projection starts as the image one
            attn = model.get_submodule(name.rsplit(".", 1)[0])
            attn.to_out_control.weight.copy_(attn.to_out.weight)
            attn.to_out_control.bias.copy_(attn.to_out.bias)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:10]}")
