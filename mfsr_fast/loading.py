"""Loading models for upscaling: devices and dtypes, the embedded default, model folders, training runs and
checkpoints (checked against their manifests), and what a model carries with it (its codec, its restorer).
``mfsr_fast.inference`` re-exports the public names."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from mfsr_fast.codec import PixelCodec, VAECodec
from mfsr_fast.model import MFSRTransformer

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "default")
MODEL_SCALE = 4


def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: upscaling runs on cpu, cuda or mps")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype):
    """None, a torch floating dtype or its name ('float32', 'bfloat16', 'float16') -> torch.dtype or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be None, float32, bfloat16 or float16 (a torch dtype or its name), got {dtype!r}")


def codec_of(model: MFSRTransformer, vae: str | None = None):
    """The codec between images and ``model``'s space: the one attached to it (``attach_codec``; the SD3 VAE loaded
    with a model folder), the pixel codec, or the SD3 VAE read from the folder ``vae`` (not attached)."""
    codec = getattr(model, "_mfsr_codec", None)
    if codec is not None:
        return codec
    if model.cfg.codec == "pixel4":
        return PixelCodec(MODEL_SCALE)
    if vae:
        codec = VAECodec.from_pretrained(vae)
        if codec.latent_channels != model.cfg.in_channels:
            raise ValueError(f"the VAE in {vae} has {codec.latent_channels} latent channels, the model "
                             f"{model.cfg.in_channels}")
        return codec
    raise ValueError(f"this model uses the {model.cfg.codec!r} codec and no VAE was loaded with it: load it from a "
                     "folder with a vae/ subfolder (load_model(PATH)), or attach_codec(model, VAECodec(...))")


def restorer_of(model: MFSRTransformer):
    """The frozen restorer a restorer-conditioned model needs (``None`` for the others), on the model's device: the
    one attached with ``attach_restorer``, else the one its config names, looked up in the model's folder first
    (``mfsr_fast.restorer.resolve_restorer``). Restorers loaded from a folder are shared per folder and device
    (``load_restorer``'s cache), so a model that changed device takes that device's copy instead of moving a shared
    one."""
    if not model.needs_restorer:
        return None
    from mfsr_fast.restorer import load_restorer

    dev = next(model.parameters()).device
    r = getattr(model, "_mfsr_restorer", None)
    if r is None:
        r = load_restorer(model.cfg.restorer, device=dev, model_dir=getattr(model, "_mfsr_dir", None))
    elif r.device != dev:
        r = load_restorer(r.path, device=dev, dtype=r.dtype) if r.path else r.to(device=dev)
    model._mfsr_restorer = r
    return r


def attach_restorer(model: MFSRTransformer, restorer) -> MFSRTransformer:
    """Keep ``restorer`` (a ``mfsr_fast.restorer.Restorer``) with ``model``; ``restorer_of`` puts it on the model's
    device when it is used."""
    model._mfsr_restorer = restorer
    return model


def attach_codec(model: MFSRTransformer, codec) -> MFSRTransformer:
    """Keep ``codec`` with ``model`` (for models whose codec is a VAE), on the model's device."""
    p = next(model.parameters())
    if isinstance(codec, VAECodec):
        codec.to(device=p.device)
    model._mfsr_codec = codec
    return model


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, dtype: str) -> MFSRTransformer:
    from mfsr_fast.integrity import IntegrityError, check_folder

    try:
        check_folder(path)  # a truncated or damaged file: a sentence naming it, not the loader's traceback
    except IntegrityError as e:
        raise ValueError(f"model {path!r}: {e}") from None
    m = MFSRTransformer.from_pretrained(path, low_cpu_mem_usage=False, torch_dtype=getattr(torch, dtype))
    m = m.to(device=device).eval().requires_grad_(False)
    m._mfsr_dir = path
    if m.needs_restorer:
        restorer_of(m)  # a missing restorer fails here, with what to run
    if m.cfg.codec == "sd3-vae":
        vae = _vae_folder(path)
        if vae is None:
            raise ValueError(f"model {path!r} uses the SD3 VAE, but there is no vae/ folder next to it (expected "
                             f"{os.path.join(os.path.dirname(path), 'vae')} or {os.path.join(path, 'vae')})")
        vae_dtype = torch.float32 if device == "cpu" else getattr(torch, dtype)
        attach_codec(m, VAECodec.from_pretrained(vae, dtype=vae_dtype, device=device))
    return m


def _vae_folder(path: str) -> str | None:
    for cand in (os.path.join(path, "vae"), os.path.join(os.path.dirname(os.path.abspath(path)), "vae")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None


def find_weights(path: str) -> str:
    """A save_pretrained folder (or a pipeline-style folder with transformer/ and vae/), a training checkpoint (its
    EMA weights) or a training run (its newest whole checkpoint: damaged newer ones are passed over with a warning).
    A checkpoint's files are checked against its manifest; damage is a ``ValueError`` naming the file."""
    from mfsr_fast.integrity import CHECKPOINT_FILES, IntegrityError, check_folder, checkpoint_steps, newest_checkpoint

    if os.path.isfile(os.path.join(path, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        return path
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):
        return os.path.join(path, "transformer")
    root = os.path.join(path, "checkpoints")
    if checkpoint_steps(root):
        found, skipped = newest_checkpoint(root)
        for name, why in skipped:
            warnings.warn(f"model {path}: skipping checkpoint {name}: {why}", stacklevel=3)
        if found is None:
            raise ValueError(f"model {path!r}: none of its checkpoints is whole ({skipped[-1][1]})")
        path = found
    elif os.path.isfile(os.path.join(path, "trainer_state.json")):
        try:
            check_folder(path, CHECKPOINT_FILES)
        except IntegrityError as e:
            raise ValueError(f"model {path!r}: damaged checkpoint: {e}") from None
    for sub in ("ema", "model"):
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return os.path.join(path, sub)
    raise ValueError(f"model {path!r}: no weights found (expected a save_pretrained folder, a training checkpoint "
                     "or a training run folder)")


def load_model(model="default", device=None, dtype=None) -> MFSRTransformer:
    """The model as an MFSRTransformer on ``device``: 'default', a folder, or an MFSRTransformer."""
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if isinstance(model, MFSRTransformer):
        m = model
    else:
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(f"model must be 'default', a folder or an MFSRTransformer, got {type(model).__name__}")
        model = os.fspath(model)
        if model == "default":
            if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
                raise ValueError(f"the embedded default model is missing from {DEFAULT_MODEL}: reinstall the "
                                 "package or regenerate it with `make train-default`")
            path = DEFAULT_MODEL
        elif os.path.isdir(model):
            path = find_weights(model)
        else:
            raise ValueError(f"model {model!r}: not 'default' and not a folder")
        dt = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
        m = _load(path, str(dev), str(dt).replace("torch.", ""))
    if m.cfg.learned_prompts <= 0:
        raise ValueError("this model stores no prompts: a student from training.distill carries its positive "
                         "conditioning; for a converted teacher, add prompt embeddings with model.set_prompts")
    codec_of(m)  # a VAE model without its VAE fails here, before any work
    if dtype is not None and next(m.parameters()).dtype != dtype:
        m = m.to(dtype=dtype)
    m = m.to(dev)
    if isinstance(getattr(m, "_mfsr_codec", None), VAECodec):
        m._mfsr_codec.to(device=dev)
    if m.needs_restorer:
        restorer_of(m)  # on dev: the shared copy for dev, or the attached one moved
    return m
