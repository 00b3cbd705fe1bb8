"""Training images from any folder: recursive scan, any common format, random HR crops and flips.

``ImageFolder(root, crop=256)`` yields (3, crop, crop) float tensors in [0, 1]. Greyscale, palette, CMYK and 16-bit
images are converted to RGB; RGBA is composited on white; EXIF orientation is applied. Images smaller than the crop are
upscaled (bicubic) so that their short side fits. Unreadable or corrupt files are skipped with a warning and counted
(``skipped``), at scan time when their header is broken and at load time when their data is; an empty folder is a
clear error. Crops and flips are drawn from (seed, epoch, index), so a resumed run sees the same samples.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mfsr_fast.io.images import jpeg_truncated

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


# What a file that cannot be used raises: damaged, not an image, or a decompression bomb (Pillow's own check).
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def scan(root: str) -> list[str]:
    """Image files under root (recursive, sorted), by extension."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(EXTENSIONS):
                found.append(os.path.join(dirpath, f))
    return sorted(found)


def load_rgb(path: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]; raises OSError / ValueError for unreadable files."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
            return np.repeat(arr[..., None], 3, axis=2).clip(0, 1)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        im = im.convert("RGB")
        return np.asarray(im, dtype=np.float32) / 255.0


class ImageFolder(torch.utils.data.Dataset):
    """Random HR crops of every readable image under ``root``."""

    def __init__(self, root: str, crop: int = 256, *, flip: bool = True, seed: int = 0, multiple_of: int = 1):
        if crop < 1 or crop % multiple_of:
            raise ValueError(f"crop {crop} must be positive and a multiple of {multiple_of}")
        self.root, self.crop, self.flip, self.seed = root, crop, flip, seed
        self.epoch = 0
        self.skipped: list[str] = []
        files = []
        for path in scan(root):
            try:
                with Image.open(path) as im:
                    fmt = im.format
                    im.verify()
                if fmt == "JPEG":  # verify() reads the header only: a cut-off file would train on grey rows
                    with open(path, "rb") as f:
                        if jpeg_truncated(f.read()):
                            raise ValueError("truncated JPEG (the data ends before the end-of-image marker)")
                files.append(path)
            except UNREADABLE as e:
                self._skip(path, e)
        if not files:
            raise ValueError(f"no readable images under {root} (extensions {', '.join(EXTENSIONS)}; "
                             f"{len(self.skipped)} unreadable)")
        self.files = files

    def _skip(self, path: str, err: Exception) -> None:
        if path not in self.skipped:
            self.skipped.append(path)
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        # A file whose data is corrupt (header fine) is skipped here: the next readable file takes its place.
        for attempt in range(len(self.files)):
            path = self.files[(i + attempt) % len(self.files)]
            if path in self.skipped:
                continue
            try:
                img = load_rgb(path)
                break
            except UNREADABLE as e:
                self._skip(path, e)
        else:
            raise RuntimeError(f"no readable images left under {self.root}")
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W)
        H, W = x.shape[1:]
        if min(H, W) < self.crop:
            s = self.crop / min(H, W)
            size = (max(self.crop, round(H * s)), max(self.crop, round(W * s)))
            x = torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0]
            x = x.clamp(0, 1)
            H, W = size
        top = int(torch.randint(H - self.crop + 1, (), generator=g))
        left = int(torch.randint(W - self.crop + 1, (), generator=g))
        x = x[:, top:top + self.crop, left:left + self.crop]
        if self.flip and torch.rand((), generator=g).item() < 0.5:
            x = x.flip(-1)
        return x.contiguous()
