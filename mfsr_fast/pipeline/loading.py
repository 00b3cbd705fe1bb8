"""Finding and loading models: devices and dtypes, the embedded default, model folders, training runs and
checkpoints (checked against their manifests), and the one teacher loader (evaluation, distillation and the
teacher's many-step samples all load teachers here)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from mfsr_fast.io.integrity import (
    MANIFEST,
    IntegrityError,
    check_checkpoint,
    check_folder,
    checkpoint_steps,
    newest_checkpoint,
)
from mfsr_fast.models.convert import LoadReport, load_transformer
from mfsr_fast.models.prompts import load_prompts, stacked
from mfsr_fast.models.transformer import MFSRTransformer

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "default")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device=None) -> torch.device:
    """None or 'auto' (CUDA when there is one, else the CPU), or a device name that this machine has."""
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


def resolve_dtype(dtype):
    """None, a torch floating dtype or its name ('float32', 'bfloat16', 'float16') -> torch.dtype or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be None, float32, bfloat16 or float16 (a torch dtype or its name), got {dtype!r}")


def native_bf16() -> str | None:
    """The CPU feature that makes bfloat16 fast here, as torch reports it ('AMX', 'AVX512_BF16'), or None: oneDNN
    then runs bfloat16 convolutions and matrix products in hardware instead of emulating them."""
    cpu = torch.cpu
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        if cpu._is_amx_tile_supported():
            return "AMX"
        if cpu._is_avx512_bf16_supported():
            return "AVX512_BF16"
    except (AttributeError, RuntimeError):  # a torch without these queries: no claim
        return None
    return None


@dataclass(frozen=True)
class Precision:
    """The dtypes a pipeline runs in, and why: the transformer's, the restorer's body's, and whether they were
    chosen for this machine (``auto_precision``) or given."""

    transformer: torch.dtype
    restorer: torch.dtype
    why: str

    def __str__(self) -> str:
        name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
        same = self.transformer == self.restorer
        what = name(self.transformer) if same else (f"transformer {name(self.transformer)}, "
                                                     f"restorer {name(self.restorer)}")
        return f"{what} ({self.why})"


def auto_precision(device: torch.device, dtype=None) -> Precision:
    """``dtype`` given: both networks in it. Else the one for the machine: bfloat16 on a CPU that computes it natively
    (AMX or AVX512_BF16), on CUDA and on MPS (the restorer's first and last convolution and its residual stream stay
    float32: ``RRDBNet.set_dtype``); float32 on other CPUs."""
    dt = resolve_dtype(dtype)
    if dt is not None:
        return Precision(dt, dt, "as asked")
    if device.type != "cpu":
        return Precision(torch.bfloat16, torch.bfloat16, f"chosen for {device.type}")
    feature = native_bf16()
    if feature is None:
        return Precision(torch.float32, torch.float32, "chosen for this CPU: no native bfloat16")
    return Precision(torch.bfloat16, torch.bfloat16, f"chosen for this CPU: {feature}")


def find_weights(path: str, ema: bool = True) -> str:
    """A save_pretrained folder (or a pipeline-style folder with transformer/ and vae/), a training checkpoint (its
    EMA weights, or with ``ema=False`` its raw ones) or a training run (its newest whole checkpoint: damaged newer ones
    are passed over with a warning). A checkpoint's files are checked against its manifest; damage is a
    ``ValueError`` naming the file."""
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
            check_checkpoint(path)
        except IntegrityError as e:
            raise ValueError(f"model {path!r}: damaged checkpoint: {e}") from None
    for sub in ("ema", "model") if ema else ("model",):
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return os.path.join(path, sub)
    pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))) \
        if os.path.isdir(path) else []
    if pickled:
        raise ValueError(f"model {path!r}: {pickled[0]} is a pickle file, which is never loaded (unpickling can run "
                         "code); save the weights as safetensors (save_pretrained(..., safe_serialization=True))")
    raise ValueError(f"model {path!r}: no weights found (expected a save_pretrained folder, a training checkpoint "
                     "or a training run folder)")


def model_folder(model) -> str:
    """'default' (the embedded default) or a folder (``find_weights``) -> the folder that holds the weights."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be 'default' or a folder, got {type(model).__name__}")
    model = os.fspath(model)
    if model == "default":
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
            raise ValueError(f"the embedded default model is missing from {DEFAULT_MODEL}: reinstall the package or "
                             "regenerate it with `make train-default`")
        return DEFAULT_MODEL
    if os.path.isdir(model):
        return find_weights(model)
    raise ValueError(f"model {model!r}: not 'default' and not a folder")


def checked_folder(folder: str) -> str:
    """``folder`` after ``check_folder`` (its manifest, or its files' structure): a truncated or damaged file is a
    sentence naming it, not the loader's traceback. A folder whose info.json says it was written with a manifest (an
    export) and has none is refused: its files can no longer be checked."""
    info = os.path.join(folder, "info.json")
    try:
        if os.path.isfile(info) and not os.path.isfile(os.path.join(folder, MANIFEST)):
            with open(info) as f:
                promised = json.load(f).get("manifest")
            if promised:
                raise IntegrityError(f"{promised} is missing (its info.json says the folder was written with one), "
                                     "so its files cannot be checked; export it again")
        check_folder(folder)
    except IntegrityError as e:
        raise ValueError(f"model {folder!r}: {e}") from None
    except (ValueError, AttributeError):
        raise ValueError(f"model {folder!r}: damaged info.json") from None
    return folder


def vae_folder(path: str) -> str | None:
    """The VAE a model folder carries: ``path/vae`` or a ``vae/`` beside it (a pipeline-style folder)."""
    for cand in (os.path.join(path, "vae"), os.path.join(os.path.dirname(os.path.abspath(path)), "vae")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None


def load_teacher(path: str, *, ema: bool = True, prompts: str | None = None, norm_k_bug: bool | None = None,
                 lr_conv_scale: float | None = None) -> tuple[MFSRTransformer, LoadReport, str]:
    """A teacher from a training run, a checkpoint (its EMA weights unless ``ema=False``), a save_pretrained folder or
    a DiT4SR / SD3.5 transformer folder (``models.convert.load_transformer``), frozen, in float32, with the prompt
    embeddings of the file ``prompts`` (``models.prompts``) stored in it -> (teacher, what the loader found, the
    folder it was read from). ValueError for every mistake, and when the teacher ends up with no prompts (DiT4SR and
    SD3.5 store none)."""
    try:
        folder = find_weights(path, ema)
    except ValueError:
        folder = path  # a DiT4SR / SD3.5 folder: load_transformer says what is wrong with it
    model, report = load_transformer(folder, dit4sr_norm_k_bug=norm_k_bug, lr_conv_scale=lr_conv_scale)
    if prompts:
        try:
            model.set_prompts(*stacked(load_prompts(prompts)))
        except ValueError as e:
            raise ValueError(f"--prompts: {e}") from None
    elif model.cfg.learned_prompts <= 0:
        raise ValueError(f"the teacher ({report.format}) stores no prompts: pass --prompts, a prompt-embedding file "
                         "made with `python -m mfsr_fast.models.prompts --positive ... --negative ... --out FILE`")
    return model.eval().requires_grad_(False), report, folder
