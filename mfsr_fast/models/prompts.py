"""Prompt conditioning from files, so that neither training nor inference needs a text encoder.

A prompt file is one safetensors file with, for each named prompt in PROMPT_NAMES ("positive", "negative", "null"):
``<name>.prompt_embeds`` (L, context_dim) and ``<name>.pooled_prompt_embeds`` (pooled_dim), the tensors diffusers'
``StableDiffusion3Pipeline.encode_prompt`` returns (one batch row each). ``positive`` is required; ``negative`` is what
DiT4SR's guidance pushes away from; ``null`` (the dropped prompt) defaults to zeros, as SD3 drops text encodings.
The prompt texts, when known, travel in the file's metadata.

Converter from ``.pt`` / ``.pth`` files: ``python -m mfsr_fast.models.prompts --positive pos.pt --negative neg.pt
--out prompts.safetensors``. Each source is read with ``torch.load(weights_only=True)``, which refuses pickled code,
and may hold a tensor (then give the pooled one with ``--positive-pooled``), a (prompt_embeds, pooled) pair, or a
dict with ``prompt_embeds`` and ``pooled_prompt_embeds`` (``negative_*`` keys are taken for ``--negative`` from the
same file). A ``.safetensors`` source works the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mfsr_fast.io.integrity import apply_umask
from mfsr_fast.models.transformer import PROMPT_NAMES

Prompts = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def _row(t, what: str, dims: int) -> torch.Tensor:
    """One prompt's tensor with ``dims`` dimensions; a leading batch of one is dropped, a larger batch refused."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dim() == dims + 1:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: holds a batch of {t.shape[0]} prompts; give one")
        t = t[0]
    if t.dim() != dims:
        raise ValueError(f"{what}: expected {dims} dimensions (or a batch of one), got shape {tuple(t.shape)}")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise ValueError(f"{what}: must be finite floating-point values")
    return t.detach().float().contiguous()


def save_prompts(path: str, prompts: Prompts, texts: dict[str, str] | None = None) -> None:
    """Write ``prompts`` ({name: (context (L, D), pooled (P) or None)}) to a safetensors file, atomically."""
    check_prompts(prompts)
    tensors = {}
    for name, (ctx, pooled) in prompts.items():
        tensors[f"{name}.prompt_embeds"] = ctx.float().contiguous()
        if pooled is not None:
            tensors[f"{name}.pooled_prompt_embeds"] = pooled.float().contiguous()
    meta = {f"{k}.text": v for k, v in (texts or {}).items()}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".prompts-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_prompts(prompts: Prompts) -> None:
    unknown = sorted(set(prompts) - set(PROMPT_NAMES))
    if unknown:
        raise ValueError(f"unknown prompt names {unknown}; known: {PROMPT_NAMES}")
    if "positive" not in prompts:
        raise ValueError("the positive prompt is required")
    shapes = {n: (tuple(c.shape), None if p is None else tuple(p.shape)) for n, (c, p) in prompts.items()}
    for n, (c, p) in shapes.items():
        if len(c) != 2 or (p is not None and len(p) != 1):
            raise ValueError(f"prompt {n!r}: expected prompt_embeds (L, D) and pooled (P,), got {c} and {p}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"prompts must share one shape (SD3 pads every prompt to the same length): {shapes}")


def load_prompts(path: str) -> Prompts:
    """{name: (context (L, D), pooled (P,) or None)} for every prompt in PROMPT_NAMES; ``null`` is zeros when the
    file does not hold it."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r}: not found (make one with `python -m mfsr_fast.models.prompts`)")
    try:
        with safe_open(path, "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"prompt file {path!r}: not a safetensors file ({e})") from None
    prompts: Prompts = {}
    for name in PROMPT_NAMES:
        if f"{name}.prompt_embeds" in data:
            prompts[name] = (data[f"{name}.prompt_embeds"].float(), data.get(f"{name}.pooled_prompt_embeds"))
    stray = sorted(k for k in data if k.split(".", 1)[0] not in prompts)
    if stray:
        raise ValueError(f"prompt file {path!r}: unexpected tensors {stray}")
    check_prompts(prompts)
    if "null" not in prompts:
        ctx, pooled = prompts["positive"]
        prompts["null"] = (torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled))
    return prompts


def stacked(prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (3, L, D), pooled (3, P) or None) in PROMPT_NAMES order, for ``MFSRTransformer.set_prompts``; a
    missing ``negative`` becomes the null prompt."""
    full = dict(prompts)
    full.setdefault("negative", full["null"])
    ctx = torch.stack([full[n][0] for n in PROMPT_NAMES])
    pooled = None if full["positive"][1] is None else torch.stack([full[n][1] for n in PROMPT_NAMES])
    return ctx, pooled


# Converting .pt files.


def _read_source(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but plain tensors and containers
        raise ValueError(f"{path}: refused: not a plain tensor file readable with weights_only=True ({e})") from None


def read_prompt(path: str, pooled_path: str | None = None, role: str = "positive"):
    """(context (L, D), pooled (P,) or None) from a source file (see the module docstring)."""
    obj = _read_source(path)
    ctx = pooled = None
    if isinstance(obj, torch.Tensor):
        ctx = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        ctx, pooled = obj
    elif isinstance(obj, dict):
        pre = "negative_" if role == "negative" and "negative_prompt_embeds" in obj else ""
        if f"{pre}prompt_embeds" not in obj:
            raise ValueError(f"{path}: a dict without '{pre}prompt_embeds' (keys: {sorted(obj)[:10]})")
        ctx, pooled = obj[f"{pre}prompt_embeds"], obj.get(f"{pre}pooled_prompt_embeds")
    else:
        raise ValueError(f"{path}: expected a tensor, a (prompt_embeds, pooled) pair or a dict, got "
                         f"{type(obj).__name__}")
    if pooled_path is not None:
        if pooled is not None:
            raise ValueError(f"{path} already holds a pooled embedding; drop --{role}-pooled")
        pooled = _read_source(pooled_path)
        if isinstance(pooled, dict) and len(pooled) == 1:
            pooled = next(iter(pooled.values()))
    return _row(ctx, f"{path}: {role} prompt_embeds", 2), (None if pooled is None else
                                                           _row(pooled, f"{path}: {role} pooled", 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert prompt embeddings (.pt / .safetensors) into one prompt file.")
    for name in PROMPT_NAMES:
        ap.add_argument(f"--{name}", help=f"{name} prompt embeddings" + (" (required)" if name == "positive" else ""),
                        required=name == "positive")
        ap.add_argument(f"--{name}-pooled", help=f"{name} pooled embedding, when not in the --{name} file")
        ap.add_argument(f"--{name}-text", help=f"the {name} prompt's text, kept as metadata")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    args = ap.parse_args(argv)
    try:
        prompts, texts = {}, {}
        for name in PROMPT_NAMES:
            src = getattr(args, name)
            if src:
                prompts[name] = read_prompt(src, getattr(args, f"{name}_pooled"), name)
            if getattr(args, f"{name}_text"):
                texts[name] = getattr(args, f"{name}_text")
        save_prompts(args.out, prompts, texts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    L, D = prompts["positive"][0].shape
    print(f"wrote {args.out}: {', '.join(prompts)} ({L} tokens x {D})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
