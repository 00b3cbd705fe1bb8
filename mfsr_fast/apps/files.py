"""Image files through a pipeline, for the command line and the web page alike: finding the inputs, naming the
outputs, and one file in, one file out (``upscale_file``) with its bit depth, alpha and metadata kept."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from mfsr_fast.io.images import ImageError, read_image, write_image
from mfsr_fast.pipeline.pipeline import MFSRPipeline

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def list_inputs(src: str, recursive: bool) -> list[tuple[str, str]]:
    """(path, path relative to the input root) of every candidate image of a file or a folder."""
    if os.path.isfile(src):
        return [(src, os.path.basename(src))]
    if not os.path.isdir(src):
        raise ImageError(f"{src}: no such file or folder")
    found = []
    if recursive:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(EXTENSIONS):
                    p = os.path.join(root, f)
                    found.append((p, os.path.relpath(p, src)))
    else:
        for f in sorted(os.listdir(src)):
            p = os.path.join(src, f)
            # A broken symbolic link is kept: it fails with its reason, as it does with -r, not silently.
            if (os.path.isfile(p) or os.path.islink(p)) and f.lower().endswith(EXTENSIONS):
                found.append((p, f))
    return found


def earlier_outputs(files: list[tuple[str, str]], src: str, out_dir: str, suffix: str) -> set[str]:
    """The paths among ``files`` (a folder's listing) that are outputs of an earlier run, never inputs: everything
    under an output folder that lies inside the input folder, and, where the two are one folder, the files whose
    names end with the output suffix."""
    if not os.path.isdir(src):
        return set()  # a file named on the command line is an input
    out_real, src_real = os.path.realpath(out_dir), os.path.realpath(src)
    below = out_real != src_real and out_real.startswith(src_real.rstrip(os.sep) + os.sep)
    found = set()
    for path, _ in files:
        real = os.path.realpath(path)
        if not real.startswith(out_real.rstrip(os.sep) + os.sep):
            continue
        if below or (suffix and os.path.splitext(os.path.basename(path))[0].endswith(suffix)):
            found.add(path)
    return found


def probe_bits(path: str) -> int:
    """8 or 16: the bit depth the output will keep, from the file's header (no decoding); 8 if unreadable."""
    try:
        with Image.open(path) as im:
            return 16 if im.mode.startswith("I;16") or im.mode == "I" or im.mode in ("RGB;16", "RGBA;16") else 8
    except Exception:  # unreadable files fail later with their reason
        return 8


def output_path(rel: str, out_dir: str, suffix: str, ext: str | None, bits: int) -> str:
    """Where the output of the input ``rel`` goes: its stem plus ``suffix``, in ``ext`` (default: the input's own
    format; PNG for 16-bit, GIF and BMP inputs)."""
    stem, in_ext = os.path.splitext(rel)
    if ext:
        e = "." + ext.lower().lstrip(".")
    elif bits == 16 or in_ext.lower() in (".gif", ".bmp"):
        e = ".png"  # keep 16-bit depth; GIF/BMP outputs are better as PNG
    else:
        e = in_ext.lower()
    return os.path.join(out_dir, stem + suffix + e)


def output_clashes(files: list[tuple[str, str]], out_dir: str, suffix: str, ext: str | None) -> list[str]:
    """Inputs that would be written to the same output name (x.jpg and x.png with --ext png)."""
    seen: dict[str, str] = {}
    out = []
    for path, rel in files:
        target = os.path.normcase(os.path.abspath(output_path(rel, out_dir, suffix, ext, probe_bits(path))))
        if target in seen:
            out.append(f"{seen[target]} and {path} would both be written to {target}")
        else:
            seen[target] = path
    return out


def check_output_folder(folder: str) -> str | None:
    """None when ``folder`` exists (or was created) and is writable, else why not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"--output {folder} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create the output folder {folder}: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write to the output folder {folder} (permission denied)"
    return None


# Largest side each output format can hold (Pillow's WebP and JPEG encoders refuse more).
MAX_SIDE = {".webp": 16383, ".jpg": 65535, ".jpeg": 65535}


class Skipped(Exception):
    """An input whose output is already there (a batch run again): not a failure; the message says why."""


def output_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(width, height) of the output of an (H, W, C) input at ``scale``: the pipeline's own rounding."""
    return max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))


def check_output(out_path: str, size: tuple[int, int], overwrite: bool, protected=()) -> None:
    """Everything about where an output goes that can fail, checked before it is computed: an input there, a
    folder there, a format that cannot hold the size; ``Skipped`` when the output exists (and not ``overwrite``)."""
    if os.path.realpath(out_path) in protected:
        raise ImageError(f"output {out_path} would overwrite an input; choose another --output or --suffix")
    if os.path.isdir(out_path):
        raise ImageError(f"output {out_path} is a folder; move it or choose another --output or --suffix")
    ext = os.path.splitext(out_path)[1].lower()
    if ext in MAX_SIDE and max(size) > MAX_SIDE[ext]:
        raise ImageError(f"the {size[0]}x{size[1]} output is larger than {ext[1:].upper()} holds ({MAX_SIDE[ext]} "
                         "px a side): use --ext png or tif, or a smaller --scale")
    if os.path.lexists(out_path) and not overwrite:
        raise Skipped(f"{out_path} exists (--overwrite replaces it)")


def upscale_file(path: str, out_for, pipe: MFSRPipeline, *, scale: float, steps: int, detail: float = 1.0,
                 tile: int | None = None, seed: int = 0, color_fix: str | None = None, overwrite: bool = False,
                 protected=(), progress=None):
    """Read ``path``, upscale it and write it (atomically) to ``out_for(bits)``, keeping its bit depth, alpha and
    metadata; returns (output path, ImageMeta). Everything that is the file's fault, or the machine's (out of
    memory), is an ImageError with a message for the user, raised before the upscale where it can be known then;
    ``Skipped`` when the output exists. ``protected``: real paths never written to (the inputs)."""
    arr, meta = read_image(path)
    out_path = out_for(meta.bits)
    check_output(out_path, output_size(arr.shape, scale), overwrite, protected)
    try:
        res = pipe.upscale_array(arr, scale=scale, steps=steps, seed=seed, detail=detail, tile=tile,
                                 color_fix=color_fix, progress=progress,
                                 out_dtype=np.uint16 if meta.bits == 16 else np.uint8)
    except torch.OutOfMemoryError:
        raise ImageError("out of GPU memory even at the smallest tile; try --tile 64 or --device cpu") from None
    except (MemoryError, RuntimeError) as e:  # the CPU allocator's failure is a RuntimeError
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise ImageError(f"out of memory ({str(e).splitlines()[0] if str(e) else 'MemoryError'}); the output "
                         "alone needs width x height x channels bytes: try a smaller --scale") from None
    del arr
    write_image(out_path, res, meta)
    return out_path, meta
