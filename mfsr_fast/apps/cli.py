"""``mfsr-upscale`` / ``python -m mfsr_fast``: upscale a file or a folder of images into an output folder.

Never overwrites an input, never takes an earlier run's outputs as inputs, writes each output atomically (a killed run's
half-written files are removed by the next), skips outputs that are already there (a batch run again finishes what is
left), continues past files that fail, lists them at the end and exits with status 1 if any failed (2 for a usage error,
found before any image is computed; 130 after Ctrl-C, with a summary of what was written). The web page is its own
command, ``mfsr-web`` (``apps.web``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from mfsr_fast import __version__
from mfsr_fast.apps.files import (
    EXTENSIONS,
    Skipped,
    check_output_folder,
    earlier_outputs,
    list_inputs,
    output_clashes,
    output_path,
    upscale_file,
)
from mfsr_fast.io.images import ImageError, remove_stale_parts
from mfsr_fast.pipeline.compose import COLOR_FIXES
from mfsr_fast.pipeline.inputs import check_run, check_steps_scale
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.pipeline.upscale import cached_pipeline
from mfsr_fast.sampling.config import check_share, read_sampler_file

OUTPUT_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mfsr-upscale", description="x4 real-world super-resolution (MeanFlow, "
                                 "1-4 steps) of an image file or a folder of images.")
    ap.add_argument("input", help="an image file or a folder of images")
    ap.add_argument("-o", "--output", default="upscaled", help="output folder (default: %(default)s)")
    ap.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    ap.add_argument("--scale", type=float, default=4.0, help="output / input size (default 4)")
    ap.add_argument("--steps", type=int, default=1, help="MeanFlow steps, 1-4 useful (default 1)")
    ap.add_argument("--detail", type=float, default=1.0, metavar="D",
                    help="how much of the model's texture over Real-ESRGAN's output to keep, 0-1 (default 1: all; "
                    "0.5 for smoother skin; restorer-conditioned models such as the default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=None, help="LR tile side in pixels (default: from free memory)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="precision of both networks (default: the machine's: bfloat16 where the CPU computes it "
                    "natively, AMX or AVX512_BF16, and on GPUs; float32 elsewhere)")
    ap.add_argument("--model", default="default", help="'default' or a model / training run folder")
    ap.add_argument("--sampler", default=None, metavar="FILE.json",
                    help="the model's sampler with the fields this JSON file gives replaced (docs/usage.md)")
    ap.add_argument("--suffix", default="_x4", help="added to each output name (default: %(default)s)")
    ap.add_argument("--ext", default=None, help="output format: png, jpg, webp, tif (default: the input's)")
    ap.add_argument("--color-fix", choices=COLOR_FIXES, default=None, help="match colours to the LR")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return ap


def _usage(msg: str) -> int:
    print(f"mfsr-upscale: {msg}", file=sys.stderr)
    return 2


def _check_names(args) -> None:
    """--suffix and --ext name files inside -o: no folder separators, nothing that walks out of it."""
    for flag, value in (("--suffix", args.suffix), ("--ext", args.ext or "")):
        if "/" in value or os.sep in value or (os.altsep and os.altsep in value) or ".." in value:
            raise ValueError(f"{flag} {value!r}: a name part, without folder separators or '..' (outputs stay in "
                             "--output)")
    if args.ext and args.ext.lower().lstrip(".") not in OUTPUT_EXTENSIONS:
        raise ValueError(f"--ext {args.ext}: use png, jpg, webp, tif or bmp")


def _files(args) -> list[tuple[str, str]]:
    """The inputs, after every check that needs no model: the numbers, the names, the inputs (less the outputs of
    an earlier run), names that would collide, the output folder. ValueError (ImageError included) with what is
    wrong."""
    check_steps_scale(args.steps, args.scale)
    check_run(args.tile, args.seed, None)
    check_share("detail", args.detail)
    _check_names(args)
    files = list_inputs(args.input, args.recursive)
    ours = earlier_outputs(files, args.input, args.output, args.suffix)
    if ours:
        files = [f for f in files if f[0] not in ours]
        print(f"left out {len(ours)} earlier output(s) of mfsr-upscale in {args.output} (outputs are never inputs)")
    if not files:
        raise ValueError(f"no images in {args.input} ({', '.join(EXTENSIONS)})")
    clashes = output_clashes(files, args.output, args.suffix, args.ext)
    if clashes:
        raise ValueError("output names collide (nothing was written): " + "; ".join(clashes)
                         + ". Use --suffix or --ext so that each input gets its own name, or upscale them separately")
    why = check_output_folder(args.output)
    if why:
        raise ValueError(why)
    return files


def _pipeline(args) -> MFSRPipeline:
    """The model's pipeline with the ``--sampler`` file's fields over its own sampler, ``--detail`` checked against
    it. ValueError with what is wrong."""
    pipe = cached_pipeline(args.model, args.device, args.dtype)
    if args.sampler:
        pipe = pipe.with_sampler(read_sampler_file(args.sampler, pipe.sampler))
    pipe.check_detail(args.detail)  # e.g. a detail below 1 needs R(LR)
    print(f"model {args.model} on {pipe.device}, {pipe.precision}")
    return pipe


@dataclass
class Tally:
    """What a batch did, for its summary."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


def _one(args, path: str, rel: str, pipe: MFSRPipeline, inputs: set[str], tally: Tally) -> None:
    """One file of the batch into ``tally``; whatever goes wrong with it fails this file only."""
    try:
        _, meta = upscale_file(path, lambda bits: output_path(rel, args.output, args.suffix, args.ext, bits), pipe,
                               scale=args.scale, steps=args.steps, detail=args.detail, tile=args.tile,
                               seed=args.seed, color_fix=args.color_fix, overwrite=args.overwrite, protected=inputs)
        tally.written += 1
        for note in meta.notes:
            tqdm.write(f"{rel}: {note}")
    except Skipped as e:
        tally.skipped += 1
        tqdm.write(f"skipped: {e}")
    except (ImageError, ValueError, OSError) as e:
        tally.failed.append((path, str(e)))
        tqdm.write(f"failed: {e}")
    except Exception as e:  # a reader's or writer's own error: this file fails, the batch goes on
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        tally.failed.append((path, why))
        tqdm.write(f"failed: {path}: {why}")


def _run(args, files: list[tuple[str, str]], pipe: MFSRPipeline) -> Tally:
    """Upscale every file with a progress bar; Ctrl-C stops between (or inside) files, keeping what was written."""
    tally = Tally()
    t0 = time.perf_counter()
    inputs = {os.path.realpath(p) for p, _ in files}
    for folder in sorted({os.path.dirname(output_path(rel, args.output, args.suffix, args.ext, 8))
                          for _, rel in files}):
        for name in remove_stale_parts(folder):
            print(f"removed {os.path.join(folder, name)} (half-written by a run that was killed)")
    bar = tqdm(files, unit="img", desc="upscale", disable=None)
    try:
        for path, rel in bar:
            bar.set_postfix_str(rel[-40:])
            _one(args, path, rel, pipe, inputs, tally)
    except KeyboardInterrupt:
        tally.interrupted = True
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    done = tally.written + tally.skipped + len(tally.failed)
    print(("interrupted: " if tally.interrupted else "")
          + f"{tally.written} image(s) written to {args.output} in {dt:.1f} s"
          + (f" ({dt / tally.written:.2f} s per image)" if tally.written else "")
          + (f"; {tally.skipped} skipped (already there)" if tally.skipped else "")
          + (f"; {len(files) - done} not done" if tally.interrupted else ""))
    return tally


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Everything that can be checked before any image is computed is checked first: the inputs, names that would
    # collide, the output folder, then the model.
    try:
        files = _files(args)
        pipe = _pipeline(args)
    except ValueError as e:
        return _usage(str(e))
    except KeyboardInterrupt:
        print("interrupted before any image was computed", file=sys.stderr)
        return 130
    tally = _run(args, files, pipe)
    if tally.failed:
        print(f"{len(tally.failed)} failed:", file=sys.stderr)
        for path, why in tally.failed:
            print(f"  {path}: {why}", file=sys.stderr)
    return 130 if tally.interrupted else 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
