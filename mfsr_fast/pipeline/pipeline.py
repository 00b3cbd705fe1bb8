"""``MFSRPipeline``: x4 real-world super-resolution of any image a user has, in 1 to 4 MeanFlow steps.

Like a diffusers pipeline, one object owns its parts: the transformer, the codec between images and its space, the
frozen restorer R of a restorer-conditioned model (Real-ESRGAN x4plus) and the sampler (``sampling.config``:
``SamplerConfig`` for a student, ``TeacherSampling`` for a teacher), which ``from_pretrained`` reads from
``sampler_config.json`` beside the model's ``config.json`` and ``save_pretrained`` writes there.

Inputs: a path, a PIL image, a numpy array (H, W[, C]) of uint8 / uint16 / float in [0, 1], or a torch tensor
((C, H, W) or (B, C, H, W), float in [0, 1]). Output: a PIL image for a path or PIL input (a uint16 numpy array
when the file was 16-bit, which PIL cannot hold as RGB), the input's own type otherwise.

Large images are processed in overlapping tiles blended with a raised-cosine window, row band by row band, straight
into the output array (``tiling``, ``rows``: memory is the model, one row of tiles and the output); the noise is
drawn per block from the seed and the position, so overlapping tiles see the same noise. The tile size comes from
the free memory, and a CUDA out-of-memory error retries with smaller tiles.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from mfsr_fast.io.images import array_to_pil, pil_to_array, read_image
from mfsr_fast.models.codec import VAECodec, make_codec
from mfsr_fast.models.conditioning import SCALE, lr_condition
from mfsr_fast.models.convert import load_mfsr
from mfsr_fast.models.restorer import Restorer, load_restorer
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.pipeline.compose import check_color_fix, compose_flat
from mfsr_fast.pipeline.inputs import as_float, check_out_dtype, check_run, check_steps_scale, checked_unit
from mfsr_fast.pipeline.loading import (
    Precision,
    auto_precision,
    checked_folder,
    load_teacher,
    model_folder,
    resolve_device,
    resolve_dtype,
    vae_folder,
)
from mfsr_fast.pipeline.rows import RowSink
from mfsr_fast.pipeline.tiling import RestoredRows, auto_tile, auto_tile_batch, tile_rows
from mfsr_fast.sampling.config import SamplerConfig, TeacherSampling, check_share, load_sampler, save_sampler
from mfsr_fast.sampling.guidance import sample_teacher
from mfsr_fast.sampling.meanflow import sample

Sampler = SamplerConfig | TeacherSampling


class MFSRPipeline:
    """x4 super-resolution with a transformer, its codec, its restorer and a sampler.

    ``pipe = MFSRPipeline.from_pretrained("default")`` (or a folder: an export, a training run, a checkpoint);
    ``pipe(image, steps=1)``. The sampler is the expert's handle on how the steps are taken:
    ``pipe.sampler = dataclasses.replace(pipe.sampler, flat_detail=1.0)``. ``MFSRPipeline(transformer)`` builds the
    parts a pixel-codec model needs (the restorer by the name its config gives, looked up in ``folder`` first)."""

    def __init__(self, transformer: MFSRTransformer, codec=None, restorer: Restorer | None = None,
                 sampler: Sampler | None = None, *, folder: str | None = None):
        self.transformer = transformer
        self.codec = codec if codec is not None else make_codec(transformer.cfg)
        if restorer is None and transformer.needs_restorer:
            restorer = load_restorer(transformer.cfg.restorer, device=self.device, dtype=self.dtype, model_dir=folder)
        self.restorer = restorer if transformer.needs_restorer else None
        self.folder = folder
        self.sampler = sampler if sampler is not None else SamplerConfig()
        rdt = self.restorer.dtype if self.restorer is not None else self.dtype
        self.precision = Precision(self.dtype, rdt, "as built")

    @classmethod
    def from_pretrained(cls, model="default", *, device=None, dtype=None) -> MFSRPipeline:
        """'default' (the embedded default) or a folder: an exported model, a training run (its newest whole
        checkpoint) or a checkpoint (its EMA weights), on ``device`` (default: CUDA when there is one) in ``dtype``
        (default: the precision chosen for the machine, ``loading.auto_precision``; ``pipe.precision`` says which ran
        and why). A folder written before samplers had their own file gets the sampler its config.json held."""
        dev = resolve_device(device)
        precision = auto_precision(dev, dtype)
        folder = checked_folder(model_folder(model))
        dt = precision.transformer
        transformer = load_mfsr(folder, dt)
        transformer = transformer.to(device=dev).eval().requires_grad_(False)
        cfg = transformer.cfg
        restorer = load_restorer(cfg.restorer, device=dev, dtype=precision.restorer, model_dir=folder) \
            if transformer.needs_restorer else None
        codec = None
        if cfg.codec == "sd3-vae":
            vae = vae_folder(folder)
            if vae is None:
                raise ValueError(f"model {folder!r} uses the SD3 VAE, but there is no vae/ folder next to it (expected "
                                 f"{os.path.join(os.path.dirname(folder), 'vae')} or {os.path.join(folder, 'vae')})")
            codec = make_codec(cfg, vae, dtype=torch.float32 if dev.type == "cpu" else dt, device=dev)
        if cfg.learned_prompts <= 0:
            raise ValueError("this model stores no prompts: a student from training.distill carries its positive "
                             "conditioning; for a converted teacher, add prompt embeddings with model.set_prompts")
        pipe = cls(transformer, codec, restorer, load_sampler(folder), folder=folder)
        pipe.precision = precision
        return pipe

    @classmethod
    def from_teacher(cls, path: str, *, device=None, prompts: str | None = None, vae: str | None = None,
                     sampler: TeacherSampling | None = None) -> MFSRPipeline:
        """A flow-matching teacher (``loading.load_teacher``: a run, a checkpoint, a model folder, or a DiT4SR / SD3.5
        folder with the prompt file ``prompts``) as a pipeline that samples it (``TeacherSampling``, default: one
        unguided Euler step per step), in float32, with the SD3 VAE from the folder ``vae`` when it works in latents.
        ValueError for every mistake."""
        dev = resolve_device(device)
        teacher, _, folder = load_teacher(path, prompts=prompts)
        teacher = teacher.to(dev)
        codec = None
        if teacher.cfg.codec == "sd3-vae":
            if not vae:
                raise ValueError("the teacher works in SD3 VAE latents: pass --vae")
            codec = make_codec(teacher.cfg, vae, device=dev)
        return cls(teacher, codec, folder=folder, sampler=sampler or TeacherSampling())

    def save_pretrained(self, folder: str, *, restorer: bool = True) -> None:
        """The transformer (config.json + safetensors), the sampler (sampler_config.json), a VAE codec's VAE
        (``vae/``) and, unless ``restorer=False``, the restorer's folder (``restorer/``; without it the folder names
        the restorer, found by name where the set-up installs it)."""
        self.transformer.save_pretrained(folder, safe_serialization=True)
        save_sampler(self.sampler, folder)
        if isinstance(self.codec, VAECodec):
            self.codec.vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
        if restorer and self.restorer is not None:
            self.restorer.save(os.path.join(folder, "restorer"))

    # The parts.

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def has_base(self) -> bool:
        """Whether the model's flow runs over a base (R(LR) for a restorer-conditioned one), so that a ``detail``
        below 1 means something."""
        return self.transformer.cfg.residual_scale > 0

    @property
    def composes(self) -> bool:
        """Whether a ``flat_detail`` below 1 means something: a restorer-conditioned residual model."""
        return self.has_base and self.transformer.needs_restorer

    @property
    def sampler(self) -> Sampler:
        return self._sampler

    @sampler.setter
    def sampler(self, value: Sampler) -> None:
        if not isinstance(value, (SamplerConfig, TeacherSampling)):
            raise TypeError(f"sampler must be a SamplerConfig or a TeacherSampling, got {type(value).__name__}")
        if value.flat_detail != 1 and not self.composes:
            raise ValueError(f"flat_detail {value.flat_detail} scales what a model adds to Real-ESRGAN's output where "
                             "that is flat: this model is not a restorer-conditioned residual model (lr_source "
                             "'restorer' or 'both', residual_scale > 0); use flat_detail 1")
        self._sampler = value

    def with_sampler(self, sampler: Sampler) -> MFSRPipeline:
        """The same parts with another sampler (a shallow copy: nothing is loaded or moved)."""
        other = copy.copy(self)
        other.sampler = sampler
        return other

    def check_detail(self, detail) -> float:
        """``detail`` in [0, 1], and below 1 only where it means something: a student whose flow has a base."""
        check_share("detail", detail)
        if detail != 1 and not self.has_base:
            raise ValueError(f"detail {detail} scales what a model adds to its base (R(LR)): this model's flow has no "
                             "base (residual_scale 0); use detail 1")
        if detail != 1 and isinstance(self.sampler, TeacherSampling):
            raise ValueError("detail scales a student's output; this pipeline samples a teacher (TeacherSampling)")
        return float(detail)

    def to(self, device=None, dtype=None) -> MFSRPipeline:
        """The transformer and the restorer's body in ``dtype``; every part on ``device`` (a restorer read from a
        folder as the shared copy for that device and dtype, so that moving one pipeline never moves another's).
        Returns the pipeline."""
        dt = resolve_dtype(dtype)
        if dt is not None:
            nn.Module.to(self.transformer, dtype=dt)  # (diffusers' to() warns on any dtype)
        dev = resolve_device(device) if device is not None else self.device
        if device is not None:
            self.transformer.to(dev)
            if isinstance(self.codec, VAECodec):
                self.codec.to(device=dev)
        r = self.restorer
        if r is not None and (r.device != dev or (dt is not None and r.dtype != dt)):
            rdt = dt or r.dtype
            self.restorer = load_restorer(r.path, device=dev, dtype=rdt) if r.path else r.to(device=dev, dtype=rdt)
        if dt is not None:
            self.precision = Precision(dt, dt, "as asked")
        return self

    # An image in, an image out.

    def __call__(self, image, *, scale: float = 4, steps: int = 1, seed: int = 0, detail: float = 1.0,
                 tile: int | None = None, color_fix: str | None = None, progress=None):
        """Upscale ``image`` (path, PIL image, numpy array or torch tensor) by ``scale`` (the model's x4, then a
        high-quality resize for other factors) in ``steps`` steps; see ``mfsr_fast.upscale`` for the options."""
        kw = dict(scale=scale, steps=steps, seed=seed, detail=detail, tile=tile, color_fix=color_fix,
                  progress=progress)
        if isinstance(image, (str, os.PathLike, Image.Image)):
            arr, meta = read_image(image) if not isinstance(image, Image.Image) else pil_to_array(image)
            res = self.upscale_array(arr, **kw, out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
            return res if meta.bits == 16 else array_to_pil(res, meta)
        if isinstance(image, np.ndarray):
            arr, bits = as_float(image)
            res = self.upscale_array(arr, **kw, out_dtype={8: np.uint8, 16: np.uint16}.get(bits, np.float32))
            if image.ndim == 2:
                res = res[..., 0]
            return res if bits else res.astype(image.dtype)
        if isinstance(image, torch.Tensor):
            t = image[None] if image.dim() == 3 else image
            if t.dim() != 4 or t.shape[1] not in (1, 2, 3, 4) or not t.is_floating_point() or t.numel() == 0:
                raise ValueError("tensor image must be float (C, H, W) or (B, C, H, W) in [0, 1] with C in 1..4 and "
                                 f"no empty dimension, got {tuple(image.shape)} {image.dtype}")
            frames = [checked_unit(s.detach().permute(1, 2, 0).float().cpu().numpy(), "tensor image") for s in t]
            outs = [torch.from_numpy(self.upscale_array(f, **kw)).permute(2, 0, 1) for f in frames]
            out = torch.stack(outs).to(device=image.device, dtype=image.dtype)
            return out if image.dim() == 4 else out[0]
        raise ValueError(f"image must be a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")

    def upscale_array(self, arr: np.ndarray, *, scale: float = 4, steps: int = 1, seed: int = 0, detail: float = 1.0,
                      tile: int | None = None, color_fix: str | None = None, progress=None,
                      out_dtype=np.float32) -> np.ndarray:
        """(H, W, C) float32 in [0, 1], C in 1..4 (grey, grey + alpha, RGB, RGBA) -> the upscaled array, same C, in
        ``out_dtype``: float32 in [0, 1], or uint8 / uint16 (rounded), which is what bounds memory for large images:
        the output is filled row band by row band (``rows.RowSink``), so peak memory is the model, one row of tiles
        and this array."""
        H, W, C = arr.shape
        if H < 1 or W < 1:
            raise ValueError(f"zero-size image ({W}x{H})")
        steps, scale = check_steps_scale(steps, scale)
        check_run(tile, seed, progress)
        detail = self.check_detail(detail)
        out_dtype = check_out_dtype(out_dtype)
        check_color_fix(color_fix)
        arr = checked_unit(arr, "image")
        has_alpha = C in (2, 4)
        color = arr[..., : C - 1] if has_alpha else arr
        x = torch.from_numpy(np.ascontiguousarray(color)).permute(2, 0, 1)[None].to(self.device)  # (1, 3 or 1, H, W)
        if x.shape[1] == 1:
            x = x.expand(1, 3, H, W)  # grey as RGB without a copy
        oh, ow = max(1, round(H * scale)), max(1, round(W * scale))
        try:
            out = np.empty((oh, ow, C), dtype=out_dtype)
        except MemoryError:
            raise MemoryError(f"not enough memory for the {ow}x{oh} output "
                              f"({oh * ow * C * out_dtype.itemsize / 2**30:.1f} GiB)") from None
        alpha = np.ascontiguousarray(arr[..., -1]) if has_alpha else None
        with _ProgressBar(progress) as bar:
            self._stream(out, x, dict(steps=steps, seed=seed, detail=detail, progress=bar.callback), tile,
                         dict(color_fix=color_fix, grey=color.shape[2] == 1, alpha=alpha))
        return out

    def _stream(self, out: np.ndarray, x: torch.Tensor, run: dict, tile: int | None, finish: dict) -> None:
        """The rows of ``x``'s output into ``out`` (``rows.RowSink``); a CUDA out-of-memory error starts the image
        again with smaller tiles (rows are rewritten)."""
        H, W = x.shape[-2:]
        tile = tile or auto_tile(self.transformer, self.codec, self.device)
        group = auto_tile_batch(self.transformer, self.codec, self.device, tile)
        while True:
            sink = RowSink(out, x, scale=SCALE, **finish)
            try:
                with torch.inference_mode():
                    for r0, rows in self._rows(x, tile=tile, overlap=None, tile_batch=group, restored=None, **run):
                        rows = rows[:, :, : max(0, min(rows.shape[2], SCALE * H - r0)), : SCALE * W]  # no padding
                        if rows.shape[2]:
                            sink.push(r0, rows)
                break
            except torch.OutOfMemoryError as e:
                tile, group = _smaller(self.device, tile, group, e)
        assert sink.done(), "internal error: output rows missing"

    def upscale_rgb(self, rgb: torch.Tensor, *, steps: int = 1, seed: int = 0, detail: float = 1.0,
                    tile: int | None = None, overlap: int | None = None,
                    progress: Callable[[int, int], None] | None = None, tile_batch: int | None = None,
                    restored: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] on the pipeline's device -> (B, 3, 4H, 4W), tiled when larger than ``tile`` LR
        pixels, the whole float output at once (``upscale_array`` streams rows into the output array instead).
        ``tile_batch``: tiles per model call (default ``tiling.auto_tile_batch``); the result does not depend on it
        beyond rounding. ``restored``: R(rgb) (B, 3, 4H, 4W) computed already, for a restorer-conditioned model
        (else it runs band by band, each band as the whole image would, ``Restorer.rows``)."""
        B, _, H, W = rgb.shape
        detail = self.check_detail(detail)
        tile = tile or auto_tile(self.transformer, self.codec, rgb.device)
        group = tile_batch or auto_tile_batch(self.transformer, self.codec, rgb.device, tile)
        while True:
            try:
                gen = self._rows(rgb, steps=steps, seed=seed, detail=detail, tile=tile, overlap=overlap,
                                 progress=progress, tile_batch=group, restored=restored)
                out = torch.cat([rows for _, rows in gen], dim=2)
                break
            except torch.OutOfMemoryError as e:
                tile, group = _smaller(rgb.device, tile, group, e)
        return out[:, :, : SCALE * H, : SCALE * W]

    # Tiles.

    @property
    def lr_multiple(self) -> int:
        """LR sizes must be multiples of this so that the latent is whole patches: patch x codec factor / 4."""
        return max(1, self.transformer.cfg.patch_size * self.codec.factor // SCALE)

    def _rows(self, rgb: torch.Tensor, *, steps: int, seed: int, detail: float, tile: int, overlap: int | None,
              progress, tile_batch: int, restored: torch.Tensor | None):
        """The rows generator of the padded image's x4 output: see ``tiling.tile_rows``."""
        rgb, rrows = self._prepare(rgb, restored)

        def run(lr, noise, r):
            return self._sample_tile(lr, noise, steps, r, detail)

        return tile_rows(run, rgb, scale=SCALE, cells_per_px=SCALE / self.codec.factor,
                         channels=self.codec.latent_channels, seed=seed, tile=tile, overlap=overlap,
                         multiple=self.lr_multiple, group=tile_batch, restored=rrows, progress=progress)

    def _prepare(self, rgb: torch.Tensor, restored: torch.Tensor | None):
        """Pad ``rgb`` to whole latent patches by reflection (replicate where a side is too short to reflect) and give
        the R(LR) row source of a restorer-conditioned model (None for the others): R of the unpadded image (or the
        given ``restored``), padded at x4 the same way."""
        B, _, H, W = rgb.shape
        s = SCALE
        if restored is not None and restored.shape != (B, 3, s * H, s * W):
            raise ValueError(f"restored must be (B, 3, 4H, 4W) = {(B, 3, s * H, s * W)}, got {tuple(restored.shape)}")
        m = self.lr_multiple
        Hp, Wp = -(-H // m) * m, -(-W // m) * m
        mode = "reflect" if Hp - H < H and Wp - W < W else "replicate"
        rows = None
        if self.restorer is not None:
            full = restored.to(device=rgb.device) if restored is not None else None
            rows = RestoredRows(self.restorer, rgb, s, full=full, padded=(Hp, Wp), mode=mode)
        if (Hp, Wp) != (H, W):
            rgb = F.pad(rgb, (0, Wp - W, 0, Hp - H), mode=mode)
        return rgb, rows

    @torch.inference_mode()
    def _sample_tile(self, lr: torch.Tensor, noise: torch.Tensor, steps: int, restored: torch.Tensor | None,
                     detail: float) -> torch.Tensor:
        """lr (B, 3, h, w) in [0, 1], h and w multiples of ``lr_multiple``; noise (B, C, 4h / f, 4w / f) in the
        codec's space; ``restored`` R(lr) (B, 3, 4h, 4w) for restorer-conditioned models -> (B, 3, 4h, 4w). The flow
        runs in the model's space (``to_flow``: a scaled residual over R(LR) for residual models); a student's
        ``detail`` below 1 scales that residual before it is added back; the sampler's ``flat_detail`` below 1
        composes the decoded output with R(LR) where R(LR) is flat (``compose.compose_flat``)."""
        model, how = self.transformer, self.sampler
        dtype = next(model.parameters()).dtype
        c = lr_condition(model, self.codec, lr, restored).to(dtype)
        if isinstance(how, TeacherSampling):
            y = sample_teacher(model, c, noise.to(dtype), steps=steps, guidance=how)
        else:
            y = self._meanflow(c, noise.to(dtype), steps)
            if detail != 1:  # base + detail (output - base): check_detail made sure the model has a base
                y = y * detail
        out = self.codec.decode(model.from_flow(y, c).float()).clamp(0, 1)
        if how.flat_detail != 1:  # likewise, with R(LR) (the sampler setter: a restorer-conditioned model)
            out = compose_flat(restored, out, how.flat_detail)
        return out

    def _meanflow(self, c: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """A student's MeanFlow jumps from ``noise`` on the sampler's grid, conditioned on ``c``."""
        model, how = self.transformer, self.sampler
        B, patch = c.shape[0], model.cfg.patch_size
        ctx, pooled = model.prompt("positive", B)
        calls = itertools.count()

        def fn(z, t, r):
            # Every other step sees the token grid moved by half a patch: patch-edge errors of one step then fall
            # inside the next step's patches instead of adding up on one grid. The first step is unmoved, so one
            # step is unchanged.
            shift = (next(calls) % 2) * (patch // 2)
            return shifted_call(lambda zz, cc: model.field(zz, cc, t.expand(B), r.expand(B), ctx, pooled), z, c,
                                shift, patch)

        return sample(fn, noise, timesteps=how.grid(steps, device=noise.device), jump=how.jump)


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


def _smaller(device: torch.device, tile: int, group: int, err: Exception) -> tuple[int, int]:
    """After a CUDA out-of-memory error: half the tiles per call, then half the tile; ``err`` again at the floor."""
    if device.type != "cuda" or (tile <= 32 and group == 1):
        raise err
    torch.cuda.empty_cache()
    return (tile, group // 2) if group > 1 else (tile // 2, group)


class _ProgressBar:
    """``progress``: None, a callable (done, total), or True for a tqdm bar over tiles (``callback`` drives it)."""

    def __init__(self, progress):
        self.bar, self.callback = None, progress or None
        if progress is True:
            self.bar = tqdm(total=None, desc="upscale", unit="tile", leave=False)
            self.callback = self._update

    def _update(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
