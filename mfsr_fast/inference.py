"""``mfsr_fast.upscale``: x4 real-world super-resolution in 1 to 4 MeanFlow steps, for any image a user has.

Inputs: a path, a PIL image, a numpy array (H, W[, C]) of uint8 / uint16 / float in [0, 1], or a torch tensor
((C, H, W) or (B, C, H, W), float in [0, 1]). Output: a PIL image for a path or PIL input (a uint16 numpy array
when the file was 16-bit, which PIL cannot hold as RGB), the input's own type otherwise.

Large images are processed in overlapping tiles blended with a raised-cosine window, row band by row band, straight
into the output array (``mfsr_fast.tiling``: memory is the model, one row of tiles and the output); the noise is
drawn per block from the seed and the position, so overlapping tiles see the same noise and the output does not
depend on the tile size. The tile size comes from the free memory, and a CUDA out-of-memory error retries with
half the tile (``upscale_rgb``).
"""

from __future__ import annotations

import functools
import itertools
import numbers
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mfsr_fast.codec import PixelCodec, VAECodec
from mfsr_fast.guidance import sample_teacher
from mfsr_fast.imageio import ImageError, ImageMeta, array_to_pil, pil_to_array, read_image
from mfsr_fast.meanflow import sample, time_grid
from mfsr_fast.model import MFSRTransformer
from mfsr_fast.tiling import RestoredRows, RowSink, tile_rows

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


def lr_condition(model: MFSRTransformer, codec, lr: torch.Tensor, restored: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The LR stream's input for LR images (B, 3, h, w) in [0, 1], encoded by ``codec``: the bicubic upsampling x4,
    R(LR) (``restored``, (B, 3, 4h, 4w) in [0, 1]) or both concatenated, as the model's ``lr_source`` says."""
    source = model.cfg.lr_source
    if source == "bicubic":
        return codec.encode(_bicubic(lr, (MODEL_SCALE * lr.shape[-2], MODEL_SCALE * lr.shape[-1])))
    if restored is None or restored.shape[-2:] != (MODEL_SCALE * lr.shape[-2], MODEL_SCALE * lr.shape[-1]):
        raise ValueError(f"lr_source {source!r} needs R(LR) at x{MODEL_SCALE} the LR size")
    c = codec.encode(restored)
    if source == "restorer":
        return c
    return torch.cat([c, codec.encode(_bicubic(lr, restored.shape[-2:]))], dim=1)


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


# Colour correction against the LR image.


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    C = x.shape[1]
    pad = 2 * dilation
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(C, 1, 1, 5).contiguous(), groups=C, dilation=(1, dilation))
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(C, 1, 5, 1).contiguous(), groups=C, dilation=(dilation, 1))


def _low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    for i in range(levels):
        x = _blur(x, 2 ** i)
    return x


def color_fix(out: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Match the colours of ``out`` to ``ref`` (the bicubic-upsampled LR): 'wavelet' swaps the low-frequency band,
    'adain' matches each channel's mean and standard deviation."""
    if method == "wavelet":
        return (out - _low(out) + _low(ref)).clamp(0, 1)
    if method == "adain":
        dims = (2, 3)
        mo, so = out.mean(dims, keepdim=True), out.std(dims, keepdim=True)
        mr, sr = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
        return ((out - mo) / (so + 1e-6) * sr + mr).clamp(0, 1)
    raise ValueError(f"color_fix must be None, 'wavelet' or 'adain', got {method!r}")


# The model on one (tile of an) RGB image.


def _bicubic(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


@torch.inference_mode()
def _sr_tile(model: MFSRTransformer, lr: torch.Tensor, noise: torch.Tensor, steps: int,
             teacher_guidance: float | None = None, restored: torch.Tensor | None = None) -> torch.Tensor:
    """lr (B, 3, h, w) in [0, 1], h and w multiples of ``_lr_multiple``; noise (B, C, 4h / f, 4w / f) in the codec's
    space; ``restored`` R(lr) (B, 3, 4h, 4w) for restorer-conditioned models: -> (B, 3, 4h, 4w). A student takes
    MeanFlow jumps; with ``teacher_guidance`` the model is sampled as a teacher (Euler steps of the guided velocity).
    The flow runs in the model's space (``to_flow``: a scaled residual over R(LR) for residual models)."""
    codec = codec_of(model)
    B = lr.shape[0]
    dtype = next(model.parameters()).dtype
    c = lr_condition(model, codec, lr, restored).to(dtype)
    if teacher_guidance is not None:
        y = sample_teacher(model, c, noise.to(dtype), steps=steps, guidance=teacher_guidance)
    else:
        ctx, pooled = model.prompt("positive", B)
        calls = itertools.count()

        def fn(z, t, r):
            # Every other step sees the token grid moved by half a patch: patch-edge errors of one step then fall
            # inside the next step's patches instead of adding up on one grid (benchmarks/RESULTS.md, "multi-step
            # patch grid"). The first step is unmoved, so one step is unchanged.
            shift = (next(calls) % 2) * (model.cfg.patch_size // 2)
            return shifted_call(lambda zz, cc: model.field(zz, cc, t.expand(B), r.expand(B), ctx, pooled), z, c,
                                shift, model.cfg.patch_size)

        y = sample(fn, noise.to(dtype), timesteps=time_grid(steps, refine_t=model.cfg.refine_t, device=noise.device))
    return codec.decode(model.from_flow(y, c).float()).clamp(0, 1)


def shifted_call(f, z: torch.Tensor, c: torch.Tensor, shift: int, patch: int) -> torch.Tensor:
    """``f(z, c)`` with the patch grid moved by ``shift`` latent cells (0 <= shift < patch) down and right: both
    inputs padded by reflection (``shift`` before, ``patch - shift`` after, so the size stays whole patches), the
    output cropped back. ``shift = 0`` is ``f(z, c)`` itself."""
    if shift == 0:
        return f(z, c)
    if not 0 < shift < patch:
        raise ValueError(f"shift must be in [0, {patch}), got {shift}")
    pad = (shift, patch - shift, shift, patch - shift)
    out = f(F.pad(z, pad, mode="reflect"), F.pad(c, pad, mode="reflect"))
    return out[:, :, shift:shift + z.shape[-2], shift:shift + z.shape[-1]]


def _lr_multiple(model: MFSRTransformer) -> int:
    """LR sizes must be multiples of this so that the latent is whole patches: patch x codec factor / 4."""
    return max(1, model.cfg.patch_size * codec_of(model).factor // MODEL_SCALE)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 2 * 2**30
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except OSError:
            pass
    return free


def _tile_memory(model: MFSRTransformer, tile: int) -> int:
    """Estimated working memory (bytes) of one LR tile of side ``tile``: model activations and the decoder's."""
    cfg = model.cfg
    codec = codec_of(model)
    lat = MODEL_SCALE / codec.factor  # latent cells per LR pixel
    tokens = 2 * (int(tile * lat) // cfg.patch_size) ** 2  # HR and LR streams
    est = tokens * cfg.num_heads * cfg.head_dim * 4 * 40 + (MODEL_SCALE * tile) ** 2 * 3 * 4 * 8
    if isinstance(codec, VAECodec):  # the VAE decoder's full-resolution activations (128 channels, fp32)
        est += (MODEL_SCALE * tile) ** 2 * 128 * 4 * 6
    return est


def auto_tile(model: MFSRTransformer, device: torch.device) -> int:
    """LR tile side: the model's native size (``sample_size``, the latent side its positions are scaled for; the
    ``tiny`` recipes train on half that side, and 16 px tiles measured no better for the default: RESULTS.md), or
    less when its estimated working memory would not fit in a quarter of the free memory. Measured on the tiny
    default (128 px DRealSR LR, CPU): tiles of 32 gave 33.26 dB / NIQE 6.81 in 9 s, the whole image 33.06 dB /
    6.33 in 14 s."""
    free = _free_memory(device)
    native = max(32, int(model.cfg.sample_size / (MODEL_SCALE / codec_of(model).factor)))
    for tile in (512, 384, 256, 192, 128, 96, 64, 32):
        if tile <= native and _tile_memory(model, tile) < free / 4:
            return tile
    return 32


def auto_tile_batch(model: MFSRTransformer, device: torch.device, tile: int) -> int:
    """Tiles per model call: on a GPU as many as a quarter of the free memory holds (up to 64), since one call per
    small tile leaves the GPU waiting on the host; 1 on the CPU, where batching gains little and costs memory."""
    if device.type != "cuda":
        return 1
    return int(max(1, min(64, _free_memory(device) / 4 // max(1, _tile_memory(model, tile)))))


def _prepare(model: MFSRTransformer, rgb: torch.Tensor, restored: torch.Tensor | None):
    """Pad ``rgb`` to whole latent patches by reflection (replicate where a side is too short to reflect) and give
    the R(LR) row source of a restorer-conditioned model (None for the others): R of the unpadded image (or the
    given ``restored``), padded at x4 the same way."""
    B, _, H, W = rgb.shape
    s = MODEL_SCALE
    if restored is not None and restored.shape != (B, 3, s * H, s * W):
        raise ValueError(f"restored must be (B, 3, 4H, 4W) = {(B, 3, s * H, s * W)}, got {tuple(restored.shape)}")
    m = _lr_multiple(model)
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    mode = "reflect" if Hp - H < H and Wp - W < W else "replicate"
    rows = None
    if model.needs_restorer:
        full = restored.to(device=rgb.device, dtype=torch.float32) if restored is not None else None
        rows = RestoredRows(restorer_of(model), rgb, s, full=full, padded=(Hp, Wp), mode=mode)
    if (Hp, Wp) != (H, W):
        rgb = F.pad(rgb, (0, Wp - W, 0, Hp - H), mode=mode)
    return rgb, rows


def _rows(model: MFSRTransformer, rgb: torch.Tensor, *, steps: int, seed: int, tile: int | None, overlap: int | None,
          progress, teacher_guidance: float | None, tile_batch: int | None, restored: torch.Tensor | None):
    """The rows generator of the padded image's x4 output: see ``tiling.tile_rows``."""
    device = rgb.device
    codec = codec_of(model)
    rgb, rrows = _prepare(model, rgb, restored)
    tile = tile or auto_tile(model, device)
    group = tile_batch or auto_tile_batch(model, device, tile)

    def run(lr, noise, r):
        return _sr_tile(model, lr, noise, steps, teacher_guidance, r)

    return tile_rows(run, rgb, scale=MODEL_SCALE, cells_per_px=MODEL_SCALE / codec.factor,
                     channels=codec.latent_channels, seed=seed, tile=tile, overlap=overlap,
                     multiple=_lr_multiple(model), group=group, restored=rrows, progress=progress)


def upscale_rgb(model: MFSRTransformer, rgb: torch.Tensor, *, steps: int = 1, seed: int = 0, tile: int | None = None,
                overlap: int | None = None, progress: Callable[[int, int], None] | None = None,
                teacher_guidance: float | None = None, tile_batch: int | None = None,
                restored: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] on the model's device -> (B, 3, 4H, 4W), tiled when larger than ``tile`` LR pixels.
    ``teacher_guidance=w`` samples the model as a flow-matching teacher (Euler, CFG w; 1: no guidance).
    ``tile_batch``: tiles per model call (default ``auto_tile_batch``); the result does not depend on it beyond
    rounding, nor on the tile size through the noise (drawn per block from the seed and the position:
    ``tiling.noise_window``). A restorer-conditioned model runs its restorer band by band, each band as the whole
    image would (``Restorer.rows``); ``restored`` passes R(rgb) (B, 3, 4H, 4W) computed already. This returns the
    whole float output; ``upscale_array`` streams rows into the output array instead."""
    B, _, H, W = rgb.shape
    tile = tile or auto_tile(model, rgb.device)
    group = tile_batch or auto_tile_batch(model, rgb.device, tile)
    while True:
        try:
            gen = _rows(model, rgb, steps=steps, seed=seed, tile=tile, overlap=overlap, progress=progress,
                        teacher_guidance=teacher_guidance, tile_batch=group, restored=restored)
            out = torch.cat([rows for _, rows in gen], dim=2)
            break
        except torch.OutOfMemoryError as e:
            tile, group = _smaller(rgb.device, tile, group, e)
    return out[:, :, : MODEL_SCALE * H, : MODEL_SCALE * W]


def _smaller(device: torch.device, tile: int, group: int, err: Exception) -> tuple[int, int]:
    """After a CUDA out-of-memory error: half the tiles per call, then half the tile; ``err`` again at the floor."""
    if device.type != "cuda" or (tile <= 32 and group == 1):
        raise err
    torch.cuda.empty_cache()
    return (tile, group // 2) if group > 1 else (tile // 2, group)


# The public function.


def _as_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """numpy image -> (H, W, C) float32 in [0, 1] and its bit depth (8, 16, or 0 for float input)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"numpy image must be (H, W) or (H, W, C) with C in 1..4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, 16
    if np.issubdtype(arr.dtype, np.floating):
        return _checked_unit(arr.astype(np.float32), "numpy image"), 0
    raise ValueError(f"numpy image dtype must be uint8, uint16 or float, got {arr.dtype}")


def _check_steps_scale(steps, scale) -> tuple[int, float]:
    """steps: an integer in 1..64 (numpy integers too, not bool); scale: a real number in (0, 16] (not bool)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= 64:
        raise ValueError(f"steps must be an integer in 1..64, got {steps!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) <= 16:
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    return int(steps), float(scale)


def _checked_unit(arr: np.ndarray, what: str) -> np.ndarray:
    """Every input type's one check of float pixels: finite, and in [0, 1] (values a rounding away are clipped;
    a 0-255 or 0-65535 float image is refused with the division it needs, instead of turning white)."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if hi > 1.5 or lo < -0.5:
        hint = " (divide by 255 for 8-bit values)" if hi <= 255 else " (divide by 65535 for 16-bit values)"
        raise ValueError(f"float {what} values must lie in [0, 1], got {lo:g}..{hi:g}{hint}")
    if hi > 1 + 1e-3 or lo < -1e-3:
        warnings.warn(f"float {what} values {lo:g}..{hi:g} clipped to [0, 1]", stacklevel=3)
    if lo >= 0 and hi <= 1:  # already in range: no copy (large inputs are checked twice on the numpy path)
        return arr.astype(np.float32, copy=False)
    return np.clip(arr, 0, 1).astype(np.float32, copy=False)


def upscale_array(arr: np.ndarray, *, scale: float = 4, steps: int = 1, model="default", device=None, dtype=None,
                  tile: int | None = None, seed: int = 0, progress=None, color_fix_method: str | None = None,
                  out_dtype=np.float32) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C in 1..4 (grey, grey + alpha, RGB, RGBA) -> the upscaled array, same C, in
    ``out_dtype``: float32 in [0, 1], or uint8 / uint16 (rounded), which is what bounds memory for large images:
    the output is filled row band by row band (``tiling.RowSink``), so peak memory is the model, one row of tiles
    and this array."""
    H, W, C = arr.shape
    if H < 1 or W < 1:
        raise ValueError(f"zero-size image ({W}x{H})")
    steps, scale = _check_steps_scale(steps, scale)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"out_dtype must be float32, uint8 or uint16, got {out_dtype}")
    if color_fix_method not in (None, "wavelet", "adain"):
        raise ValueError(f"color_fix must be None, 'wavelet' or 'adain', got {color_fix_method!r}")
    arr = _checked_unit(arr, "image")
    m = load_model(model, device, dtype)
    dev = next(m.parameters()).device
    has_alpha = C in (2, 4)
    color = arr[..., : C - 1] if has_alpha else arr
    x = torch.from_numpy(np.ascontiguousarray(color)).permute(2, 0, 1)[None].to(dev)  # (1, 3 or 1, H, W)
    if x.shape[1] == 1:
        x = x.expand(1, 3, H, W)  # grey as RGB without a copy
    oh, ow = max(1, round(H * scale)), max(1, round(W * scale))
    try:
        out = np.empty((oh, ow, C), dtype=out_dtype)
    except MemoryError:
        raise MemoryError(f"not enough memory for the {ow}x{oh} output ({oh * ow * C * out_dtype.itemsize / 2**30:.1f}"
                          " GiB)") from None
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=None, desc="upscale", unit="tile", leave=False)

        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
    alpha = np.ascontiguousarray(arr[..., -1]) if has_alpha else None
    s = MODEL_SCALE
    tile = tile or auto_tile(m, dev)
    group = auto_tile_batch(m, dev, tile)
    while True:  # a CUDA out-of-memory error starts the image again with smaller tiles; rows are rewritten
        sink = RowSink(out, x, scale=s, color_fix=color_fix_method, grey=color.shape[2] == 1, alpha=alpha,
                       fix=color_fix, bicubic=_bicubic)
        try:
            gen = _rows(m, x, steps=steps, seed=seed, tile=tile, overlap=None, progress=progress or None,
                        teacher_guidance=None, tile_batch=group, restored=None)
            with torch.inference_mode():
                for r0, rows in gen:
                    rows = rows[:, :, : max(0, min(rows.shape[2], s * H - r0)), : s * W]  # drop the padding
                    if rows.shape[2]:
                        sink.push(r0, rows)
            break
        except torch.OutOfMemoryError as e:
            tile, group = _smaller(dev, tile, group, e)
    if bar is not None:
        bar.close()
    assert sink.done(), "internal error: output rows missing"
    return out


def upscale(image, *, scale: float = 4, steps: int = 1, model="default", device=None, dtype=None,
            tile: int | None = None, seed: int = 0, progress=None, color_fix: str | None = None):
    """Upscale ``image`` (path, PIL image, numpy array or torch tensor) by ``scale`` (the model's x4, then a
    high-quality resize for other factors) in ``steps`` MeanFlow steps (1 to 4 is the useful range).

    Returns a PIL image for path/PIL input (a uint16 numpy array for 16-bit files), otherwise the input's type.
    ``tile``: LR tile side in pixels (None: from free memory). ``progress``: True for a bar, or a callable
    (done, total). ``color_fix``: None, 'wavelet' or 'adain' (match colours to the LR). Deterministic for a seed.
    """
    kw = dict(scale=scale, steps=steps, model=model, device=device, dtype=dtype, tile=tile, seed=seed,
              progress=progress, color_fix_method=color_fix)
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        arr, meta = read_image(image)
        res = upscale_array(arr, **kw, out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
        return res if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, Image.Image):
        arr, meta = pil_to_array(image)
        res = upscale_array(arr, **kw, out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
        return res if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, np.ndarray):
        arr, bits = _as_float(image)
        res = upscale_array(arr, **kw, out_dtype={8: np.uint8, 16: np.uint16}.get(bits, np.float32))
        if image.ndim == 2:
            res = res[..., 0]
        return res if bits else res.astype(image.dtype)
    if isinstance(image, torch.Tensor):
        t = image
        batched = t.dim() == 4
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 2, 3, 4) or not t.is_floating_point():
            raise ValueError("tensor image must be float (C, H, W) or (B, C, H, W) in [0, 1] with C in 1..4, got "
                             f"{tuple(image.shape)} {image.dtype}")
        frames = [_checked_unit(s.detach().permute(1, 2, 0).float().cpu().numpy(), "tensor image") for s in t]
        outs = [torch.from_numpy(upscale_array(f, **kw)).permute(2, 0, 1) for f in frames]
        out = torch.stack(outs).to(device=image.device, dtype=image.dtype)
        return out if batched else out[0]
    raise ValueError(f"image must be a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")


__all__ = ["upscale", "upscale_array", "upscale_rgb", "load_model", "attach_codec", "codec_of", "attach_restorer",
           "restorer_of", "lr_condition", "color_fix",
           "ImageError", "ImageMeta"]
