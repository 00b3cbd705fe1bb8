"""The restorer R: Real-ESRGAN x4plus (RRDBNet), frozen, as a first-class component (DESIGN section 8).

- ``RRDBNet``: ESRGAN's generator (Wang et al. 2018; Real-ESRGAN, Wang et al. 2021): a 3x3 conv, ``num_block``
  residual-in-residual dense blocks (three 5-conv dense blocks each, residuals scaled by 0.2), a body conv with a
  long skip, two nearest x2 upsamplings each followed by a conv, then two convs. LeakyReLU 0.2. Parameter names
  follow BasicSR's (``conv_first``, ``body.N.rdbK.convM``, ``conv_body``, ``conv_up1``, ...), so its released
  ``RealESRGAN_x4plus.pth`` (``params_ema``) loads as well.
- ``Restorer``: the frozen network on images in [0, 1], tiled with overlap for large inputs; ``load_restorer(name or
  folder)``, ``resolve_restorer`` (where a name is looked up).
The released weights are converted from their ncnn export by ``mfsr_fast.models.ncnn`` (the set-up runs it).

Licence: Real-ESRGAN and its released weights are BSD-3-Clause (Xintao Wang, 2021). ``info.json`` beside the
converted weights records it, with the source files' SHA-256.

Caution:
- In a lower precision (``Restorer.to(dtype=...)``, ``load_restorer(dtype=...)``) the convs between the first and
  the last run in it; those two and the residual stream stay float32 (``RRDBNet.set_dtype``).
- Tiles are padded with real neighbouring pixels (``pad``), so a tiled result equals the whole-image result only up to
  the receptive field beyond the pad (measured in tests/test_restorer.py on a random network).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULT_NAME = "realesrgan-x4plus"
WEIGHTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
SETUP_HINT = "run the set-up (make setup) or `python -m mfsr_fast.models.ncnn fetch`, which converts Real-ESRGAN x4plus"


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
        # The convs in the weights' dtype, the residual in x's. The features are kept only as their running
        # concatenation (B, F + k g, H, W), each new one appended to it: no second copy of them beside the conv inputs.
        feats = x.to(self.conv1.weight.dtype)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats = torch.cat([feats, F.leaky_relu(conv(feats), 0.2)], 1)  # (B, F + k g) -> (B, F + (k + 1) g)
        y = self.conv5(feats)
        del feats  # the features go before the residual's arithmetic: a smaller peak
        return _residual(x, y)


class RRDB(nn.Module):
    """Three dense blocks in a row; out = x + 0.2 rdb3(rdb2(rdb1(x)))."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(x, self.rdb3(self.rdb2(self.rdb1(x))))


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + 0.2 y in x's dtype, computed in y's memory when y is a fresh tensor of that dtype (the same sums, rounded
    the same: addition commutes exactly), so that no third activation is allocated."""
    y = y.to(x.dtype)
    return y.mul_(0.2).add_(x)


# LR rows of context a band of the upsampling tail needs on each side: conv_up1 reaches 1 row at 2x, conv_up2,
# conv_hr and conv_last 3 rows at 4x, which is 2 LR rows after the two nearest upsamplings.
TAIL_HALO = 2
TAIL_BYTES = 16 * 2**20  # what one activation of the upsampling tail may take: its bands' height follows
MIN_TAIL_ROWS = 16  # oneDNN picks other kernels (other rounding) for very short bands


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

    def forward(self, x: torch.Tensor, tail_rows: int | None = None) -> torch.Tensor:
        """``tail_rows``: run the upsampling tail (whose activations are 16x the body's) on bands of this many LR
        rows, each with ``TAIL_HALO`` rows of context, so that its working set is one band's; the result is the
        same as in one piece (each output row sees the same inputs)."""
        feat = self.conv_first(x.to(self.conv_first.weight.dtype)).float()  # (B, F, h, w): the residual stream is
        feat = feat + self.conv_body(self.body(feat).to(self.conv_body.weight.dtype)).float()  # float32 throughout
        feat = feat.to(self.conv_up1.weight.dtype)
        h = feat.shape[-2]
        if tail_rows is None or h < 2 * max(tail_rows, MIN_TAIL_ROWS):
            return self.tail(feat)
        n = -(-h // max(tail_rows, MIN_TAIL_ROWS))  # bands of equal height: no sliver at the bottom
        step = -(-h // n)
        s, out = 4, None
        for a in range(0, h, step):
            if feat.device.type == "cpu":
                _return_free_memory()  # the body's (or the last band's) activations, before this band's
            b = min(h, a + step)
            pa, pb = max(0, a - TAIL_HALO), min(h, b + TAIL_HALO)
            o = self.tail(feat[:, :, pa:pb])
            if out is None:
                out = o.new_empty(o.shape[0], o.shape[1], s * h, o.shape[-1])
            out[:, :, s * a:s * b] = o[:, :, s * (a - pa):s * (b - pa)]
        return out

    def tail(self, feat: torch.Tensor) -> torch.Tensor:
        """The body's features (B, F, h, w) -> the image (B, 3, 4h, 4w): two nearest x2 upsamplings with their
        convs, then two convs."""
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # (B, F, 2h, 2w)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # (B, F, 4h, 4w)
        feat = F.leaky_relu(self.conv_hr(feat), 0.2)
        return self.conv_last(feat.to(self.conv_last.weight.dtype)).float()  # (B, 3, 4h, 4w)

    def set_dtype(self, dtype: torch.dtype) -> RRDBNet:
        """The dense blocks, conv_body and the upsampling convs (all but 0.3 % of the work) in ``dtype``; conv_first
        and conv_last stay float32, as does the residual stream (``forward``): in bfloat16 the input's 256 levels,
        the output's and the stream's 70 sums would otherwise each be rounded to 8 significant bits."""
        self.float()
        for part in (self.body, self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr):
            part.to(dtype)
        return self

    def conv_layers(self) -> list[nn.Conv2d]:
        """Every convolution in forward order (the order of the ncnn export)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]


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
    raise ValueError(f"restorer {name_or_path!r} not found (looked in {', '.join(cands)}): {SETUP_HINT}")


class Restorer:
    """Frozen RRDBNet on images: ``R(lr)`` with lr (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1].

    ``tile``: LR tile side (None: whole image up to ``max_side``, tiles beyond); ``pad``: LR pixels of real context
    around each tile, cut off after."""

    scale = 4

    def __init__(self, net: RRDBNet, *, tile: int | None = None, pad: int = 10, max_side: int = 256):
        # channels_last: faster on the CPU (oneDNN's convolutions take it directly).
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.tile, self.pad, self.max_side = tile, pad, max_side
        self.path: str | None = None

    @classmethod
    def from_folder(cls, folder: str, device=None, dtype=torch.float32, **kw) -> Restorer:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        net = RRDBNet(**{k: cfg[k] for k in ("num_in_ch", "num_out_ch", "num_feat", "num_block", "num_grow_ch")})
        sd = load_file(os.path.join(folder, "model.safetensors"))
        try:
            net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"restorer {folder}: weights do not fit its config.json: {e}") from None
        r = cls(net.to(device=device).set_dtype(dtype), **kw)
        r.path = folder
        return r

    def save(self, folder: str) -> None:
        """The folder ``from_folder`` reads: a copy of the one it was read from (the weights as converted), else
        config.json and model.safetensors of the network as it is."""
        if self.path:
            shutil.copytree(self.path, folder)
            return
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(self.net.config, scale=self.scale), f, indent=2)

    def to(self, device=None, dtype=None) -> Restorer:
        self.net.to(device=device, memory_format=torch.channels_last)
        if dtype is not None:
            self.net.set_dtype(dtype)
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        per_row = 16 * x.shape[0] * x.shape[-1] * self.net.config["num_feat"] * self.dtype.itemsize  # at 4x, an LR row
        rows = TAIL_BYTES // per_row
        return self.net(x.contiguous(memory_format=torch.channels_last), tail_rows=rows).float().contiguous()

    @property
    def device(self) -> torch.device:
        return self.net.conv_first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The body's dtype (``RRDBNet.set_dtype``)."""
        return self.net.conv_body.weight.dtype

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
    def rows(self, lr: torch.Tensor, y0: int, y1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [s y0, s y1) of R(lr), computed exactly as the whole image would be (the same tiles with the same
        context), so that a caller can restore a large image band by band: y0 and y1 must be multiples of
        ``row_band(H, W)`` (y1 may be H). ``dtype``: what the rows are held in (each tile's rows are rounded to it as
        they are stored, so that the band is never held in float32)."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"the restorer takes (B, 3, h, w) RGB images, got {tuple(lr.shape)}")
        H, W = lr.shape[-2:]
        band = self.row_band(H, W)
        if y0 % band or not (y1 % band == 0 or y1 == H) or not 0 <= y0 < y1 <= H:
            raise ValueError(f"rows [{y0}, {y1}) of a {H}-row image must start and end on bands of {band} rows")
        tile = self._tile_for(H, W)
        if H <= tile and W <= tile:  # one piece (then the only band is the whole image)
            return self._run(lr.to(device=self.device, dtype=torch.float32)).clamp_(0, 1).to(dtype)
        s, p = self.scale, self.pad
        x = lr[:, :, max(0, y0 - p):min(H, y1 + p)].to(device=self.device, dtype=torch.float32)
        off = max(0, y0 - p)  # x's first row in lr
        out = torch.empty(x.shape[0], 3, s * (y1 - y0), s * W, device=x.device, dtype=dtype)
        for ty0 in range(y0, y1, tile):
            for x0 in range(0, W, tile):
                y1_, x1 = min(H, ty0 + tile), min(W, x0 + tile)
                py0, px0, py1, px1 = max(0, ty0 - p), max(0, x0 - p), min(H, y1_ + p), min(W, x1 + p)
                o = self._run(x[:, :, py0 - off:py1 - off, px0:px1])
                out[:, :, s * (ty0 - y0):s * (y1_ - y0), s * x0:s * x1] = o[:, :, s * (ty0 - py0):s * (y1_ - py0),
                                                                          s * (x0 - px0):s * (x1 - px0)]
                del o
                if x.device.type == "cpu":
                    _return_free_memory()  # before the next tile's working set
        return out.clamp_(0, 1)  # as clamping before the rounding would give: rounding keeps order, 0 and 1 are exact


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError, TypeError):  # another C library (macOS, musl, Windows)
        return None


_TRIM = _malloc_trim()


def _return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``), as between Real-ESRGAN's tiles and
    the bands of its upsampling tail: its hundreds of activations of a dozen sizes leave the heap fragmented, and
    without this the process's resident memory grows tile by tile although what is alive does not. Nothing where the
    C library lacks it."""
    if _TRIM is not None:
        _TRIM(0)


_CACHE: dict[tuple[str, str, str], Restorer] = {}


def clear_cache() -> None:
    """Forget the restorers ``load_restorer`` keeps (a folder replaced on disk is then read afresh)."""
    _CACHE.clear()


def load_restorer(name_or_path: str = DEFAULT_NAME, device=None, dtype=torch.float32,
                  model_dir: str | None = None) -> Restorer:
    """A ``Restorer`` (cached per folder, device and dtype): see ``resolve_restorer`` for where it is looked up."""
    folder = resolve_restorer(name_or_path, model_dir)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (os.path.abspath(folder), str(dev), str(dtype))
    if key not in _CACHE:
        _CACHE[key] = Restorer.from_folder(folder, device=dev, dtype=dtype)
    return _CACHE[key]


CROP_PAD = 4  # LR pixels of reflected context around a training crop (its borders otherwise see zeros)


def restore_crops(restorer: Restorer, lr: torch.Tensor, pad: int = CROP_PAD) -> torch.Tensor:
    """R on LR crops (B, 3, h, w) with ``pad`` reflected pixels around each (cut off after) -> (B, 3, 4h, 4w): the
    R(LR) training pools store and training runs see."""
    s = restorer.scale
    if pad > 0:
        p = min(pad, lr.shape[-1] - 1, lr.shape[-2] - 1)
        out = restorer(torch.nn.functional.pad(lr, (p, p, p, p), mode="reflect"))
        return out[:, :, s * p:out.shape[-2] - s * p, s * p:out.shape[-1] - s * p]
    return restorer(lr)
