"""``mfsr-upscale`` / ``python -m mfsr_fast``: upscale a file or a folder of images into an output folder.

Never overwrites an input, writes each output atomically, continues past files that fail, lists them at the end and
exits with status 1 if any failed (2 for a usage error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mfsr_fast.imageio import ImageError, read_image, write_image

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _inputs(src: str, recursive: bool) -> list[tuple[str, str]]:
    """(path, path relative to the input root) of every candidate image."""
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


def _probe_bits(path: str) -> int:
    """8 or 16: the bit depth the output will keep, from the file's header (no decoding); 8 if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return 16 if im.mode.startswith("I;16") or im.mode == "I" or im.mode in ("RGB;16", "RGBA;16") else 8
    except Exception:  # unreadable files fail later with their reason
        return 8


def _clashes(files: list[tuple[str, str]], args) -> list[str]:
    """Inputs that would be written to the same output name (x.jpg and x.png with --ext png)."""
    seen: dict[str, str] = {}
    out = []
    for path, rel in files:
        target = os.path.normcase(os.path.abspath(_out_path(rel, args.output, args.suffix, args.ext,
                                                            _probe_bits(path))))
        if target in seen:
            out.append(f"{seen[target]} and {path} would both be written to {target}")
        else:
            seen[target] = path
    return out


def _check_output_folder(folder: str) -> str | None:
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


def _out_path(rel: str, out_dir: str, suffix: str, ext: str | None, bits: int) -> str:
    stem, in_ext = os.path.splitext(rel)
    if ext:
        e = "." + ext.lower().lstrip(".")
    elif bits == 16 or in_ext.lower() in (".gif", ".bmp"):
        e = ".png"  # keep 16-bit depth; GIF/BMP outputs are better as PNG
    else:
        e = in_ext.lower()
    return os.path.join(out_dir, stem + suffix + e)


def upscale_file(path: str, out_for, model, *, scale: float, steps: int, tile: int | None = None, seed: int = 0,
                 color_fix: str | None = None, overwrite: bool = False, protected=(), progress=None,
                 refine_t: float | None = None, jump: str | None = None, refine_side: str | None = None,
                 detail: float | None = None, flat_detail: float | None = None):
    """Read ``path``, upscale it and write it (atomically) to ``out_for(bits)``, keeping its bit depth, alpha and
    metadata; returns (output path, ImageMeta). Everything that is the file's fault, or the machine's (out of
    memory), is an ImageError with a message for the user; the CLI and the web page (``mfsr_fast.app``) both use it.
    ``protected``: real paths never written to (the inputs)."""
    import torch

    from mfsr_fast.inference import upscale_array

    arr, meta = read_image(path)
    out_path = out_for(meta.bits)
    if os.path.realpath(out_path) in protected:
        raise ImageError(f"output {out_path} would overwrite an input; choose another --output or --suffix")
    if os.path.exists(out_path) and not overwrite:
        raise ImageError(f"{out_path} exists (use --overwrite to replace it)")
    try:
        res = upscale_array(arr, scale=scale, steps=steps, model=model, tile=tile, seed=seed, progress=progress,
                            color_fix_method=color_fix, out_dtype=np.uint16 if meta.bits == 16 else np.uint8,
                            refine_t=refine_t, jump=jump, refine_side=refine_side, detail=detail,
                            flat_detail=flat_detail)
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mfsr-upscale", description="x4 real-world super-resolution (MeanFlow, "
                                 "1-4 steps) of an image file or a folder of images.")
    ap.add_argument("input", nargs="?", help="an image file or a folder of images (none with --serve)")
    ap.add_argument("-o", "--output", default="upscaled", help="output folder (default: %(default)s)")
    ap.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    ap.add_argument("--scale", type=float, default=4.0, help="output / input size (default 4)")
    ap.add_argument("--steps", type=int, default=1, help="MeanFlow steps, 1-4 useful (default 1)")
    ap.add_argument("--refine-t", type=float, default=None, metavar="T",
                    help="steps 2-4: the grid's turning point T, below or above which its equal steps go "
                    "(--refine-side; default: the model's own)")
    ap.add_argument("--jump", choices=("average", "endpoint"), default=None,  # meanflow.JUMPS (no torch import here)
                    help="steps 2-4: 'average' (MeanFlow's) or 'endpoint' jumps (default: the model's own)")
    ap.add_argument("--refine-side", choices=("below", "above"), default=None,  # meanflow.REFINE_SIDES
                    help="steps 2-4: equal steps below T after a first jump to it, or above it from 1 down to T "
                    "and one jump to 0 (default: the model's own)")
    ap.add_argument("--detail", type=float, default=None, metavar="D",
                    help="how much of the model's texture over Real-ESRGAN's output to keep, 0-1 (default 1: all; "
                    "0.5 for smoother skin; restorer-conditioned models such as the default)")
    ap.add_argument("--flat-detail", type=float, default=None, metavar="D",
                    help="likewise, only where Real-ESRGAN's output is flat (skies, walls), full texture "
                    "elsewhere (default: the model's own, 0.25 for the default model, which takes most of the mottle "
                    "off flat areas; 1: off)")
    ap.add_argument("--tile", type=int, default=None, help="LR tile side in pixels (default: from free memory)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="default", help="'default' or a model / training run folder")
    ap.add_argument("--suffix", default="_x4", help="added to each output name (default: %(default)s)")
    ap.add_argument("--ext", default=None, help="output format: png, jpg, webp, tif (default: the input's)")
    ap.add_argument("--color-fix", choices=("wavelet", "adain"), default=None, help="match colours to the LR")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    from mfsr_fast.app import MAX_MEGAPIXELS, MAX_UPLOAD_MB  # constants only: Gradio loads with --serve

    web = ap.add_argument_group("web page (the 'web' extra: pip install 'mfsr-fast[web]')")
    web.add_argument("--serve", action="store_true", help="serve a local web page for upscaling instead")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    web.add_argument("--port", type=int, default=7860, help="(default %(default)s)")
    web.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                     help="largest upload in MB (default %(default)g)")
    web.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                     help="largest input the page accepts, in megapixels (default %(default)g)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return ap


def _version() -> str:
    from mfsr_fast import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    import torch

    from mfsr_fast.inference import load_model, student_sampling_for

    if args.steps < 1 or args.steps > 64:
        ap.error("--steps must be in 1..64")
    if not 0 < args.scale <= 16:
        ap.error("--scale must be in (0, 16]")
    if args.refine_t is not None and not 0 <= args.refine_t < 1:
        ap.error("--refine-t must be in [0, 1)")
    if args.detail is not None and not 0 <= args.detail <= 1:
        ap.error("--detail must be in [0, 1]")
    if args.flat_detail is not None and not 0 <= args.flat_detail <= 1:
        ap.error("--flat-detail must be in [0, 1]")
    if args.ext and args.ext.lower().lstrip(".") not in ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"):
        ap.error(f"--ext {args.ext}: use png, jpg, webp, tif or bmp")
    def usage(msg: str) -> int:
        print(f"mfsr-upscale: {msg}", file=sys.stderr)
        return 2

    if args.serve:
        if args.input is not None:
            ap.error("--serve takes no input: upload images on the page")
        if not 0 < args.port < 65536 or args.max_upload_mb <= 0 or args.max_megapixels <= 0:
            ap.error("--port must be in 1..65535, --max-upload-mb and --max-megapixels positive")
        from mfsr_fast.app import serve

        try:
            serve(args.model, args.device, getattr(torch, args.dtype) if args.dtype else None, host=args.host,
                  port=args.port, max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels)
        except (ImageError, ValueError) as e:
            return usage(str(e))
        return 0
    if args.input is None:
        ap.error("the following arguments are required: input (or --serve for the web page)")

    # Everything that can be checked before any image is computed is checked here, in this order: the inputs,
    # names that would collide, the output folder, then the model.
    try:
        files = _inputs(args.input, args.recursive)
    except ImageError as e:
        return usage(str(e))
    if not files:
        return usage(f"no images in {args.input} ({', '.join(EXTENSIONS)})")
    clashes = _clashes(files, args)
    if clashes:
        return usage("output names collide (nothing was written): " + "; ".join(clashes)
                     + ". Use --suffix or --ext so that each input gets its own name, or upscale them separately")
    why = _check_output_folder(args.output)
    if why:
        return usage(why)
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_model(args.model, args.device, dtype)
        student_sampling_for(model, args.refine_t, args.jump, args.refine_side, args.detail,  # e.g. detail's base
                             args.flat_detail)
    except (ImageError, ValueError) as e:
        return usage(str(e))
    from tqdm import tqdm

    failed: list[tuple[str, str]] = []
    written = 0
    t0 = time.perf_counter()
    inputs = {os.path.realpath(p) for p, _ in files}
    bar = tqdm(files, unit="img", desc="upscale", disable=None)
    for path, rel in bar:
        bar.set_postfix_str(rel[-40:])
        try:
            _, meta = upscale_file(path, lambda bits, rel=rel: _out_path(rel, args.output, args.suffix, args.ext, bits),
                                   model, scale=args.scale, steps=args.steps, tile=args.tile, seed=args.seed,
                                   color_fix=args.color_fix, overwrite=args.overwrite, protected=inputs,
                                   refine_t=args.refine_t, jump=args.jump, refine_side=args.refine_side,
                                   detail=args.detail, flat_detail=args.flat_detail)
            written += 1
            for note in meta.notes:
                tqdm.write(f"{rel}: {note}")
        except (ImageError, ValueError, OSError) as e:
            failed.append((path, str(e)))
            tqdm.write(f"failed: {e}")
    dt = time.perf_counter() - t0
    print(f"{written} image(s) written to {args.output} in {dt:.1f} s"
          + (f" ({dt / written:.2f} s per image)" if written else ""))
    if failed:
        print(f"{len(failed)} failed:", file=sys.stderr)
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
