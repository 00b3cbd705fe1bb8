"""A local web page for upscaling: ``mfsr-web`` or ``python -m mfsr_fast.apps.web`` (Gradio, the ``web`` extra).

Upload one or several images, choose steps / scale / seed / colour fix (and the detail kept, for a model over
Real-ESRGAN such as the default), compare before and after with a slider and download the full-resolution results
(same format, bit depth, alpha and metadata as the command line writes). Each file goes through the command line's
own reader and writer (``files.upscale_file``), so a bad file gets its message and the others still run. Bound to
127.0.0.1 unless ``--host`` says otherwise; uploads are limited in size and in pixels; one upscaling runs at a time
(the pipeline is shared), with a progress bar over tiles.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mfsr_fast import __version__
from mfsr_fast.apps.files import output_path, upscale_file
from mfsr_fast.io.images import ImageError
from mfsr_fast.pipeline.inputs import check_steps_scale
from mfsr_fast.pipeline.upscale import cached_pipeline
from mfsr_fast.sampling.config import read_sampler_file

PREVIEW_SIDE = 2048  # longest side of the before/after pictures shown on the page (downloads are full size)
MAX_UPLOAD_MB = 50.0  # defaults of --max-upload-mb and --max-megapixels (per input)
MAX_MEGAPIXELS = 8.0
KEEP_SECONDS = 3600  # results (and Gradio's copies of uploads) older than this are deleted
COLOR_FIX = ("none", "wavelet", "adain")


def _gradio():
    try:
        import gradio
    except ImportError:
        raise ImageError("the web page needs Gradio, an optional extra: pip install 'mfsr-fast[web]' "
                         "(from a checkout: pip install -e '.[web]')") from None
    return gradio


@dataclass
class Result:
    name: str  # the uploaded file's name
    before: str  # preview: the input enlarged (bicubic) to the output's aspect, longest side <= PREVIEW_SIDE
    after: str  # preview of the result, same size
    output: str  # the full-resolution file to download


def _previews(src: str, out_path: str, folder: str) -> tuple[str, str]:
    """before.png / after.png in ``folder``: both at the output's size, scaled to fit PREVIEW_SIDE, 8-bit RGB."""
    def rgb(im):
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit grey: Pillow's RGB conversion clips instead of scaling
            a = np.asarray(im, dtype=np.float32)
            if im.mode.startswith("I;16") or a.max() > 255:
                a = a / 65535.0 * 255.0
            im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im).convert("RGB")
        return im.convert("RGB")

    with Image.open(out_path) as o:
        after = rgb(o)
    w, h = after.size
    f = min(1.0, PREVIEW_SIDE / max(w, h))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if after.size != size:
        after = after.resize(size, Image.Resampling.LANCZOS)
    with Image.open(src) as i:
        before = rgb(i).resize(size, Image.Resampling.BICUBIC)
    b, a = os.path.join(folder, "before.png"), os.path.join(folder, "after.png")
    before.save(b)
    after.save(a)
    return b, a


class Upscaler:
    """The page's work, kept free of Gradio so that it can be tested without a browser."""

    def __init__(self, model="default", device=None, dtype=None, max_megapixels: float = MAX_MEGAPIXELS,
                 work_dir: str | None = None, sampler: str | None = None):
        self.pipe = cached_pipeline(model, device, dtype)
        if sampler:
            self.pipe = self.pipe.with_sampler(read_sampler_file(sampler, self.pipe.sampler))
        self.max_pixels = int(max_megapixels * 1e6)
        self.root = work_dir or tempfile.mkdtemp(prefix="mfsr-web-")
        os.makedirs(self.root, exist_ok=True)

    def _clean(self) -> None:
        """Delete result folders older than KEEP_SECONDS."""
        now = time.time()
        for d in os.listdir(self.root):
            p = os.path.join(self.root, d)
            try:
                if now - os.path.getmtime(p) > KEEP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def _check_size(self, path: str, name: str) -> None:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception:  # unreadable: read_image says why
            return
        if w * h > self.max_pixels:
            raise ImageError(f"{name}: {w}x{h} is larger than this page's limit of {self.max_pixels / 1e6:g} "
                             "megapixels (the server's --max-megapixels; the mfsr-upscale command line has none)")

    def run(self, files, steps=1, scale=4.0, seed=0, color_fix="none", progress=None, detail=1.0):
        """Upscale each of ``files`` (paths); returns (results, failures as (name, reason), seconds).
        ``progress(fraction, text)`` is called as tiles finish; ``detail`` as ``upscale``'s."""
        steps, scale = check_steps_scale(int(steps), float(scale))  # the library's own checks (ValueError)
        detail = self.pipe.check_detail(detail)
        seed = int(seed)
        if color_fix not in COLOR_FIX:
            raise ImageError(f"colour fix must be one of {', '.join(COLOR_FIX)}, got {color_fix!r}")
        self._clean()
        batch = tempfile.mkdtemp(dir=self.root)
        results: list[Result] = []
        failed: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        n = len(files)
        for i, path in enumerate(files):
            path = os.fspath(path)
            name = os.path.basename(path)
            folder = os.path.join(batch, str(i))  # one folder per file: equal names never collide
            os.makedirs(folder)

            def tiles(done, total, i=i, name=name):
                if progress is not None and total:
                    progress((i + done / total) / n, f"{name} ({i + 1}/{n}): tile {done}/{total}")

            try:
                self._check_size(path, name)
                out, _ = upscale_file(path, lambda bits, name=name, folder=folder: output_path(
                    name, folder, "_x4" if scale == 4 else f"_x{scale:g}", None, bits), self.pipe, scale=scale,
                    steps=steps, seed=seed, color_fix=None if color_fix == "none" else color_fix, progress=tiles,
                    detail=detail)
                before, after = _previews(path, out, folder)
                results.append(Result(name, before, after, out))
            except Exception as e:  # any one file's failure fails that file only, never the others in the request
                # The reader names the upload's temporary path: the user knows the file by its name (listed beside).
                why = str(e) if isinstance(e, (ImageError, ValueError, OSError)) else \
                    f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                why = why.replace(path, name)
                failed.append((name, why[len(name) + 2:] if why.startswith(name + ": ") else why))
        return results, failed, time.perf_counter() - t0


def _status(results, failed, seconds) -> str:
    lines = []
    if results:
        lines.append(f"**{len(results)} image(s) upscaled in {seconds:.1f} s.** Left of the slider: the input "
                     "enlarged by bicubic interpolation; right: the result. Download the full-size files below.")
    if failed:
        lines.append(f"**{len(failed)} failed:**\n" + "\n".join(f"- `{name}`: {why}" for name, why in failed))
    return "\n\n".join(lines)


def build(up: Upscaler, max_upload_mb: float = MAX_UPLOAD_MB):
    """The Gradio page over ``up``."""
    gr = _gradio()
    with gr.Blocks(title="mfsr-fast: x4 super-resolution", analytics_enabled=False,
                   delete_cache=(KEEP_SECONDS, KEEP_SECONDS)) as page:
        gr.Markdown("## mfsr-fast: x4 real-world super-resolution\nOne MeanFlow step is the default; 2-4 refine. "
                    f"Uploads up to {max_upload_mb:g} MB and {up.max_pixels / 1e6:g} megapixels each. Runs on "
                    f"{up.pipe.device} in {up.pipe.precision}.", elem_id="about")
        results = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="inputs")
                steps = gr.Slider(1, 4, value=1, step=1, label="Steps", elem_id="steps")
                scale = gr.Slider(1, 8, value=4, step=0.5, label="Scale (output / input size)", elem_id="scale")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                fix = gr.Radio(list(COLOR_FIX), value="none", label="Colour fix (match colours to the input)",
                               elem_id="color-fix")
                detail = gr.Slider(0, 1, value=1, step=0.05, elem_id="detail", visible=up.pipe.has_base,
                                   label="Detail: the model's texture over Real-ESRGAN's output (lower: smoother "
                                   "skin)")
                go = gr.Button("Upscale", variant="primary", elem_id="upscale")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                pick = gr.Dropdown(choices=[], label="Compare", visible=False, elem_id="pick")
                slider = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="compare")
                downloads = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="downloads")

        def on_upscale(paths, steps, scale, seed, fix, detail, progress=gr.Progress()):  # noqa: B008 (Gradio's)
            if not paths:
                raise gr.Error("Upload one or more images first.")
            try:
                res, failed, seconds = up.run(paths, steps, scale, seed if seed is not None else 0, fix,
                                              progress=lambda f, text: progress(f, desc=text), detail=detail)
            except ValueError as e:  # settings the page's own controls should not allow (ImageError included)
                raise gr.Error(str(e)) from None
            for name, why in failed:
                gr.Warning(f"{name}: {why}")
            names = [r.name for r in res]
            return (_status(res, failed, seconds),
                    gr.Dropdown(choices=[(n, k) for k, n in enumerate(names)],
                                value=0 if res else None, visible=len(res) > 1),
                    (res[0].before, res[0].after) if res else None,
                    [r.output for r in res] or None,
                    [(r.before, r.after) for r in res])

        def on_pick(k, pairs):
            return pairs[k] if k is not None and 0 <= k < len(pairs) else None

        go.click(on_upscale, [files, steps, scale, seed, fix, detail], [status, pick, slider, downloads, results],
                 concurrency_limit=1)
        pick.change(on_pick, [pick, results], slider)
    return page


def serve(model="default", device=None, dtype=None, host: str = "127.0.0.1", port: int = 7860,
          max_upload_mb: float = MAX_UPLOAD_MB, max_megapixels: float = MAX_MEGAPIXELS,
          open_browser: bool = False, sampler: str | None = None) -> None:
    """Load the pipeline, then serve the page until interrupted (Ctrl-C or SIGTERM); the users' results go with
    it."""
    gr = _gradio()
    check_port(host, port)  # before the model loads
    up = Upscaler(model, device, dtype, max_megapixels=max_megapixels, sampler=sampler)
    page = build(up, max_upload_mb)
    print(f"mfsr-web: model {model} on {up.pipe.device}, {up.pipe.precision}", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mfsr-web: serving on {host}: anyone who can reach this machine can use the page", file=sys.stderr)
    page.queue(default_concurrency_limit=1)
    old = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C, through the clean-up below
    try:
        page.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb:g}mb",
                    inbrowser=open_browser, theme=gr.themes.Soft(), show_error=True)
    except OSError as e:  # the port was taken between the check and the launch
        raise ValueError(f"cannot serve on {host}:{port} ({e}); choose another --port") from None
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(up.root, ignore_errors=True)


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def check_port(host: str, port: int) -> None:
    """ValueError unless ``host:port`` can be bound now (another server on it, an address this machine lacks)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        why = "in use" if getattr(e, "errno", None) == errno.EADDRINUSE else (e.strerror or str(e))
        raise ValueError(f"cannot serve on {host}:{port}: {why}; choose another --port (or --host)") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mfsr-web", description="A local web page for x4 real-world super-resolution "
                                 "(the 'web' extra: pip install 'mfsr-fast[web]').")
    ap.add_argument("--model", default="default", help="'default' or a model / training run folder")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="precision of both networks (default: the machine's, as mfsr-upscale)")
    ap.add_argument("--sampler", default=None, metavar="FILE.json",
                    help="the model's sampler with the fields this JSON file gives replaced (docs/usage.md)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="(default %(default)s)")
    ap.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                    help="largest upload in MB (default %(default)g)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                    help="largest input the page accepts, in megapixels (default %(default)g)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``mfsr-web [options]``: serve the page until interrupted; 2 for a usage error."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536 or args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        ap.error("--port must be in 1..65535, --max-upload-mb and --max-megapixels positive")
    try:
        serve(args.model, args.device, args.dtype, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
              max_megapixels=args.max_megapixels, sampler=args.sampler)
    except (ImageError, ValueError) as e:
        print(f"mfsr-web: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mfsr-web: stopped; its results folder is removed", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
