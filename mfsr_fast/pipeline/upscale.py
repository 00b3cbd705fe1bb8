"""``mfsr_fast.upscale``: the one-call API, a thin function over a cached ``MFSRPipeline``."""

from __future__ import annotations

import functools

from mfsr_fast.pipeline.compose import check_color_fix
from mfsr_fast.pipeline.inputs import check_run, check_steps_scale
from mfsr_fast.pipeline.loading import model_folder, resolve_device, resolve_dtype
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import check_share


@functools.lru_cache(maxsize=4)
def _cached(folder: str, device: str, dtype: str) -> MFSRPipeline:
    return MFSRPipeline.from_pretrained(folder, device=device, dtype=None if dtype == "auto" else dtype)


def cached_pipeline(model="default", device=None, dtype=None) -> MFSRPipeline:
    """The pipeline ``upscale`` runs: ``MFSRPipeline.from_pretrained(model, ...)``, kept for the next call with the
    same folder, device and dtype (the four most recent)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    return _cached(model_folder(model), str(dev), str(dt).replace("torch.", "") if dt is not None else "auto")


def clear_cache() -> None:
    """Forget the pipelines ``upscale`` keeps (a folder replaced on disk is then read afresh)."""
    _cached.cache_clear()


def upscale(image, *, scale: float = 4, steps: int = 1, detail: float = 1.0, seed: int = 0, model="default",
            device=None, dtype=None, tile: int | None = None, color_fix: str | None = None, progress=None):
    """Upscale ``image`` (a path, a PIL image, a numpy array or a torch tensor) by ``scale`` (the model's x4, then a
    high-quality resize for other factors) in ``steps`` MeanFlow steps (1 to 4 is the useful range).

    Returns a PIL image for a path or PIL input (a uint16 numpy array for 16-bit files), otherwise the input's type.
    - ``detail`` in [0, 1]: the share of what a restorer-conditioned model (such as the default) adds to Real-ESRGAN's
      output R(LR) that is kept: the output is R(LR) + detail (model's output - R(LR)); 1 is the model's own output,
      lower values trade its texture for R's smoothness (0.5 on faces, say).
    - ``seed``: the starting noise (the output is deterministic for a seed).
    - ``model``: 'default' (the embedded default), a folder (an exported model, a training run or checkpoint) or an
      ``MFSRPipeline``; ``device`` (default: CUDA when there is one) and ``dtype`` (a torch dtype or its name).
    - ``tile``: LR tile side in pixels (None: from free memory). ``color_fix``: None, 'wavelet' or 'adain' (match
      colours to the LR). ``progress``: True for a bar, or a callable (done, total) over tiles.
    How the steps are taken (the time grid, the kind of jump, the texture kept on flat areas) is the model's sampler
    (``MFSRPipeline.sampler``, stored in its folder's sampler_config.json); set another on a pipeline and pass it as
    ``model``."""
    check_steps_scale(steps, scale)  # the cheap mistakes before a model loads
    check_run(tile, seed, progress)
    check_share("detail", detail)
    check_color_fix(color_fix)
    if isinstance(model, MFSRPipeline):
        pipe = model.to(device, dtype) if device is not None or dtype is not None else model
    else:
        pipe = cached_pipeline(model, device, dtype)
    return pipe(image, scale=scale, steps=steps, seed=seed, detail=detail, tile=tile, color_fix=color_fix,
                progress=progress)
