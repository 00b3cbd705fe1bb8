"""``mfsr_fast.upscale``: x4 real-world super-resolution in 1 to 4 MeanFlow steps, for any image a user has.

Inputs: a path, a PIL image, a numpy array (H, W[, C]) of uint8 / uint16 / float in [0, 1], or a torch tensor
((C, H, W) or (B, C, H, W), float in [0, 1]). Output: a PIL image for a path or PIL input (a uint16 numpy array
when the file was 16-bit, which PIL cannot hold as RGB), the input's own type otherwise.

Large images are processed in overlapping tiles blended with a raised-cosine window (the noise is one global field,
sliced per tile, so overlapping tiles see the same noise); the tile size comes from the free memory, and a CUDA
out-of-memory error retries with half the tile.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mfsr_fast.codec import PixelCodec, VAECodec
from mfsr_fast.guidance import sample_teacher
from mfsr_fast.imageio import ImageError, ImageMeta, array_to_pil, pil_to_array, read_image, to_uint16
from mfsr_fast.meanflow import sample, time_grid
from mfsr_fast.model import MFSRTransformer

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "default")
MODEL_SCALE = 4


def resolve_device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


def codec_of(model: MFSRTransformer):
    """The codec between images and ``model``'s space: the pixel codec, or the SD3 VAE loaded with the model."""
    codec = getattr(model, "_mfsr_codec", None)
    if codec is not None:
        return codec
    if model.cfg.codec == "pixel4":
        return PixelCodec(MODEL_SCALE)
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
    EMA weights) or a training run (newest checkpoint)."""
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        return path
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):
        return os.path.join(path, "transformer")
    latest = os.path.join(path, "checkpoints", "latest.json")
    if os.path.isfile(latest):
        import json

        with open(latest) as f:
            path = os.path.join(path, "checkpoints", json.load(f)["path"])
    for sub in ("ema", "model"):
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return os.path.join(path, sub)
    raise ValueError(f"model {path!r}: no weights found (expected a save_pretrained folder, a training checkpoint "
                     "or a training run folder)")


def load_model(model="default", device=None, dtype=None) -> MFSRTransformer:
    """The model as an MFSRTransformer on ``device``: 'default', a folder, or an MFSRTransformer."""
    dev = resolve_device(device)
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

        def fn(z, t, r):
            return model.field(z, c, t.expand(B), r.expand(B), ctx, pooled)

        y = sample(fn, noise.to(dtype), timesteps=time_grid(steps, refine_t=model.cfg.refine_t, device=noise.device))
    return codec.decode(model.from_flow(y, c).float()).clamp(0, 1)


def _window(n: int, left: int, right: int, device) -> torch.Tensor:
    """1-D blending weights: raised-cosine ramps of the given lengths at each end, 1 in between."""
    w = torch.ones(n, device=device)
    if left > 0:
        w[:left] = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(left, device=device) + 0.5) / left)
    if right > 0:
        w[n - right:] = 0.5 + 0.5 * torch.cos(math.pi * (torch.arange(right, device=device) + 0.5) / right)
    return w


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


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


def upscale_rgb(model: MFSRTransformer, rgb: torch.Tensor, *, steps: int = 1, seed: int = 0, tile: int | None = None,
                overlap: int | None = None, progress: Callable[[int, int], None] | None = None,
                teacher_guidance: float | None = None, tile_batch: int | None = None,
                restored: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] on the model's device -> (B, 3, 4H, 4W), tiled when larger than ``tile`` LR pixels.
    ``teacher_guidance=w`` samples the model as a flow-matching teacher (Euler, CFG w; 1: no guidance).
    ``tile_batch``: tiles per model call (default ``auto_tile_batch``); the result does not depend on it beyond
    rounding. A restorer-conditioned model runs its restorer once on the whole image (tiled inside the restorer with
    real context), and each tile takes its part; ``restored`` passes R(rgb) (B, 3, 4H, 4W) computed already."""
    B, _, H, W = rgb.shape
    device = rgb.device
    codec = codec_of(model)
    m = _lr_multiple(model)
    if model.needs_restorer:
        if restored is None:
            restored = restorer_of(model)(rgb)
        elif restored.shape != (B, 3, MODEL_SCALE * H, MODEL_SCALE * W):
            raise ValueError(f"restored must be (B, 3, 4H, 4W) = {(B, 3, MODEL_SCALE * H, MODEL_SCALE * W)}, got "
                             f"{tuple(restored.shape)}")
        restored = restored.to(device=device, dtype=torch.float32)
    # Pad to whole patches in the latent by reflection (replicate where a side is too short to reflect).
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    if (Hp, Wp) != (H, W):
        mode = "reflect" if Hp - H < H and Wp - W < W else "replicate"
        rgb = F.pad(rgb, (0, Wp - W, 0, Hp - H), mode=mode)
        if restored is not None:
            s = MODEL_SCALE
            restored = F.pad(restored, (0, s * (Wp - W), 0, s * (Hp - H)), mode=mode)
    g = torch.Generator(device="cpu").manual_seed(seed)
    lh, lw = Hp * MODEL_SCALE // codec.factor, Wp * MODEL_SCALE // codec.factor
    noise = torch.randn(B, codec.latent_channels, lh, lw, generator=g).to(device)
    tile = tile or auto_tile(model, device)
    group = tile_batch or auto_tile_batch(model, device, tile)
    while True:
        try:
            out = _tiled(model, rgb, noise, steps, tile, overlap, progress, teacher_guidance, group, restored)
            break
        except torch.OutOfMemoryError:
            if device.type != "cuda" or (tile <= 32 and group == 1):
                raise
            torch.cuda.empty_cache()
            if group > 1:
                group //= 2
            else:
                tile //= 2
    return out[:, :, : MODEL_SCALE * H, : MODEL_SCALE * W]


def _tiled(model, rgb, noise, steps, tile, overlap, progress, teacher_guidance=None, group: int = 1, restored=None):
    B, _, H, W = rgb.shape
    m = _lr_multiple(model)
    n = noise.shape[-1] / W  # latent cells per LR pixel
    tile = max(8 * m, tile - tile % m)
    if H <= tile and W <= tile:
        out = _sr_tile(model, rgb, noise, steps, teacher_guidance, restored)
        if progress:
            progress(1, 1)
        return out
    ov = overlap if overlap is not None else max(8, tile // 8)
    ov = min(ov - ov % m, tile // 2)
    ys, xs = _starts(H, min(tile, H), ov), _starts(W, min(tile, W), ov)
    s = MODEL_SCALE
    acc = torch.zeros(B, 3, s * H, s * W, device=rgb.device)
    wsum = torch.zeros(1, 1, s * H, s * W, device=rgb.device)
    th, tw = min(tile, H), min(tile, W)
    cells = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    total, done = len(cells), 0
    per_call = max(1, group // B)  # tiles per model call (each tile carries the B images)
    for k in range(0, total, per_call):
        chunk = cells[k:k + per_call]
        lrs, noises, rs = [], [], []
        for i, j in chunk:
            y, x = ys[i], xs[j]
            ny, nx, nh, nw = (int(v * n) for v in (y, x, th, tw))
            lrs.append(rgb[:, :, y:y + th, x:x + tw])
            noises.append(noise[:, :, ny:ny + nh, nx:nx + nw])
            if restored is not None:
                rs.append(restored[:, :, s * y:s * (y + th), s * x:s * (x + tw)])
        outs = _sr_tile(model, torch.cat(lrs), torch.cat(noises), steps, teacher_guidance,
                        torch.cat(rs) if rs else None).split(B)
        for (i, j), out in zip(chunk, outs):
            y, x = ys[i], xs[j]
            # Ramps only where a neighbouring tile overlaps (the true overlap, which the last tile may exceed).
            top = s * (ys[i - 1] + th - y) if i > 0 else 0
            bottom = s * (y + th - ys[i + 1]) if i + 1 < len(ys) else 0
            left = s * (xs[j - 1] + tw - x) if j > 0 else 0
            right = s * (x + tw - xs[j + 1]) if j + 1 < len(xs) else 0
            wy = _window(s * th, top, bottom, rgb.device)
            wx = _window(s * tw, left, right, rgb.device)
            w = (wy[:, None] * wx[None, :])[None, None]
            acc[:, :, s * y:s * (y + th), s * x:s * (x + tw)] += out.float() * w
            wsum[:, :, s * y:s * (y + th), s * x:s * (x + tw)] += w
            done += 1
            if progress:
                progress(done, total)
    return acc / wsum.clamp_min(1e-8)


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
        if not np.isfinite(arr).all():
            raise ValueError("numpy image contains NaN or infinity")
        return np.clip(arr.astype(np.float32), 0, 1), 0
    raise ValueError(f"numpy image dtype must be uint8, uint16 or float, got {arr.dtype}")


def upscale_array(arr: np.ndarray, *, scale: float = 4, steps: int = 1, model="default", device=None, dtype=None,
                  tile: int | None = None, seed: int = 0, progress=None, color_fix_method: str | None = None,
                  ) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C in 1..4 (grey, grey + alpha, RGB, RGBA) -> the upscaled array, same C."""
    H, W, C = arr.shape
    if H < 1 or W < 1:
        raise ValueError(f"zero-size image ({W}x{H})")
    if not (isinstance(steps, int) and 1 <= steps <= 64):
        raise ValueError(f"steps must be an integer in 1..64, got {steps!r}")
    if not (isinstance(scale, (int, float)) and 0 < scale <= 16):
        raise ValueError(f"scale must be a number in (0, 16], got {scale!r}")
    m = load_model(model, device, dtype)
    dev = next(m.parameters()).device
    has_alpha = C in (2, 4)
    color = arr[..., : C - 1] if has_alpha else arr
    rgb = np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(dev)  # (1, 3, H, W)
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=None, desc="upscale", unit="tile", leave=False)

        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
    out = upscale_rgb(m, x, steps=steps, seed=seed, tile=tile, progress=progress or None)
    if bar is not None:
        bar.close()
    if color_fix_method:
        out = color_fix(out, _bicubic(x.float(), out.shape[-2:]), color_fix_method)
    oh, ow = max(1, round(H * scale)), max(1, round(W * scale))
    if (oh, ow) != tuple(out.shape[-2:]):
        out = _bicubic(out, (oh, ow))
    res = out[0].permute(1, 2, 0).float().cpu().numpy()
    if color.shape[2] == 1:
        res = res.mean(axis=2, keepdims=True)  # greyscale stays greyscale
    if has_alpha:
        a = torch.from_numpy(np.ascontiguousarray(arr[..., -1:])).permute(2, 0, 1)[None]
        a = _bicubic(a, (oh, ow))[0].permute(1, 2, 0).numpy()
        res = np.concatenate([res, a], axis=2)
    return np.clip(res, 0, 1).astype(np.float32)


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
        res = upscale_array(arr, **kw)
        return to_uint16(res) if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, Image.Image):
        arr, meta = pil_to_array(image)
        res = upscale_array(arr, **kw)
        return to_uint16(res) if meta.bits == 16 else array_to_pil(res, meta)
    if isinstance(image, np.ndarray):
        arr, bits = _as_float(image)
        res = upscale_array(arr, **kw)
        if image.ndim == 2:
            res = res[..., 0]
        if bits == 8:
            return np.clip(np.rint(res * 255), 0, 255).astype(np.uint8)
        if bits == 16:
            return to_uint16(res)
        return res.astype(image.dtype)
    if isinstance(image, torch.Tensor):
        t = image
        batched = t.dim() == 4
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 2, 3, 4) or not t.is_floating_point():
            raise ValueError("tensor image must be float (C, H, W) or (B, C, H, W) in [0, 1] with C in 1..4, got "
                             f"{tuple(image.shape)} {image.dtype}")
        outs = [torch.from_numpy(upscale_array(np.clip(s.permute(1, 2, 0).float().cpu().numpy(), 0, 1), **kw))
                .permute(2, 0, 1) for s in t]
        out = torch.stack(outs).to(device=image.device, dtype=image.dtype)
        return out if batched else out[0]
    raise ValueError(f"image must be a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")


__all__ = ["upscale", "upscale_array", "upscale_rgb", "load_model", "attach_codec", "codec_of", "attach_restorer",
           "restorer_of", "lr_condition", "color_fix",
           "ImageError", "ImageMeta"]
