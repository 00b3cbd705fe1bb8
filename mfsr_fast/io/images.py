"""Reading and writing images for the upscaler without losing what the user gave: bit depth, alpha, greyscale,
EXIF orientation, ICC profile and EXIF metadata.

Pixels travel as float32 arrays (H, W, C) in [0, 1] with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), plus
an ``ImageMeta``. 16-bit PNGs are read with pypng: Pillow opens 16-bit RGB(A) PNGs as 8-bit without a word.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import png
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from mfsr_fast.io.integrity import apply_umask

# Largest input accepted, in pixels (the output is 16x that at x4). Pillow's own bomb check uses its default limit.
MAX_INPUT_PIXELS = 64_000_000


class ImageError(ValueError):
    """A user-facing problem with an input or output image (clear message, no traceback needed)."""


def checked_unit(arr: np.ndarray, what: str) -> np.ndarray:
    """Every input's one check of float pixels (arrays, tensors and float image files alike): finite, and in [0, 1]
    (values a rounding away are clipped; a 0-255 or 0-65535 float image is refused with the division it needs,
    instead of turning white)."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if hi > 1.5 or lo < -0.5:
        hint = " (divide by 255 for 8-bit values)" if hi <= 255 else " (divide by 65535 for 16-bit values)"
        raise ValueError(f"float {what} values must lie in [0, 1], got {lo:g}..{hi:g}{hint}")
    if hi > 1 + 1e-3 or lo < -1e-3:
        warnings.warn(f"float {what} values {lo:g}..{hi:g} clipped to [0, 1]", stacklevel=3)
    if lo >= 0 and hi <= 1:  # already in range: no copy (large inputs are checked twice on the numpy path)
        return arr.astype(np.float32, copy=False)
    return np.clip(arr, 0, 1).astype(np.float32, copy=False)


@dataclass
class ImageMeta:
    bits: int = 8  # 8 or 16 (per channel, as read)
    icc_profile: bytes | None = None
    exif: bytes | None = None  # with the orientation reset to 1 (the pixels are already upright)
    format: str | None = None
    notes: list[str] = field(default_factory=list)  # what was done to read it (first frame of an animation, ...)


_ORIENT = {  # EXIF orientation -> numpy ops making the image upright
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _png_bit_depth(path: str) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _read_png16(path: str) -> np.ndarray:
    w, h, rows, info = png.Reader(filename=path).asDirect()
    planes = info["planes"]
    arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
    return arr.astype(np.float32) / 65535.0


# Tags that describe how a file lays out its pixels (size, strips, tiles, samples, compression, the thumbnail),
# not the photo: carried into an output of another size and format they are wrong, and TIFF writers refuse them.
_LAYOUT_TAGS = (0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0107, 0x0108, 0x0109, 0x010A, 0x0111,
                0x0115, 0x0116, 0x0117, 0x0118, 0x0119, 0x011C, 0x0122, 0x0123, 0x013D, 0x0140, 0x0142, 0x0143,
                0x0144, 0x0145, 0x014A, 0x0152, 0x0153, 0x0154, 0x0155, 0x0156, 0x015B, 0x0200, 0x0201, 0x0202,
                0x0211, 0x0212, 0x0213, 0x0214, 0x8773)
_EXIF_IFD, _PIXEL_DIMENSIONS = 0x8769, (0xA002, 0xA003)


def _exif_bytes(im: Image.Image) -> tuple[bytes | None, int]:
    """(the EXIF an output carries, the orientation to apply): the tags that describe the photo (camera, date,
    GPS, ...), none of the layout ones, orientation 1 (the pixels are made upright)."""
    try:
        exif = im.getexif()
        orientation = int(exif.get(0x0112, 1) or 1)
        for tag in _LAYOUT_TAGS:
            exif.pop(tag, None)
        if _EXIF_IFD in exif:
            sub = exif.get_ifd(_EXIF_IFD)
            for tag in _PIXEL_DIMENSIONS:
                sub.pop(tag, None)
    except Exception:  # malformed EXIF: keep the pixels, drop the metadata
        return None, 1
    if not exif:
        return None, 1
    if 0x0112 in exif:
        exif[0x0112] = 1
    try:
        return exif.tobytes(), orientation
    except Exception:
        return None, orientation


def jpeg_truncated(data: bytes) -> bool:
    """True when JPEG bytes end before their end-of-image marker: walks the marker segments, and the entropy-coded
    data after each start-of-scan up to the next marker (progressive files have several scans). Header-only checks
    (``Image.verify``) pass such files; decoders fill the missing rows with grey."""
    n, pos = len(data), 2
    if data[:2] != b"\xff\xd8":
        return False  # not a JPEG
    while pos < n:
        if data[pos] != 0xFF:
            return True  # lost sync: damaged
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return True
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return False  # end of image
        if marker in (0x01, *range(0xD0, 0xD8)):
            continue  # standalone markers
        if pos + 2 > n:
            return True
        pos += (data[pos] << 8) | data[pos + 1]
        if marker == 0xDA:  # entropy-coded data: runs to the next marker that is not a stuffed 0xFF00 or RSTn
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return True
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break
    return True


def read_image(path: str) -> tuple[np.ndarray, ImageMeta]:
    """(H, W, C) float32 in [0, 1] and its metadata; ImageError with a clear message for anything unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file")
    meta = ImageMeta()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image ({e}; truncated or corrupt?)") from None
    meta.format = im.format
    if im.format == "JPEG":
        with open(path, "rb") as f:
            if jpeg_truncated(f.read()):
                raise ImageError(f"{path}: truncated JPEG (the data ends before the end-of-image marker)")
    if im.width * im.height > MAX_INPUT_PIXELS:
        raise ImageError(f"{path}: {im.width}x{im.height} is larger than the {MAX_INPUT_PIXELS} pixel input limit")
    if im.width < 1 or im.height < 1:
        raise ImageError(f"{path}: zero-size image")
    if getattr(im, "n_frames", 1) > 1:
        meta.notes.append(f"animated ({im.n_frames} frames): upscaled the first frame")
        im.seek(0)
    meta.icc_profile = im.info.get("icc_profile")
    meta.exif, orientation = _exif_bytes(im)

    bits = _png_bit_depth(path) if im.format == "PNG" else None
    if bits == 16:
        try:
            arr = _read_png16(path)
        except png.Error as e:  # a chunk Pillow passes over and pypng does not (a malformed sBIT, ...)
            raise ImageError(f"{path}: damaged 16-bit PNG ({e})") from None
        meta.bits = 16
    else:
        try:
            arr = _pil_to_array(im, meta)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    return arr, meta


def _pil_to_array(im: Image.Image, meta: ImageMeta) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        meta.bits = 16
        return (np.asarray(im, dtype=np.float32) / 65535.0)[..., None]
    if mode == "I":  # 32-bit integers: taken as 16-bit values, the only scale they can be read in without a guess
        a = np.asarray(im, dtype=np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535 or (hi <= 255 and im.format != "PNG"):
            raise ImageError(f"32-bit integer pixels {lo}..{hi}: their scale is ambiguous; save the image as 8-bit "
                             "(values 0..255) or 16-bit (0..65535)")
        meta.bits = 16
        return (a.astype(np.float32) / 65535.0)[..., None]
    if mode == "F":  # floating point: the library's rule for float arrays (values in [0, 1])
        try:
            return checked_unit(np.asarray(im, dtype=np.float32), "image")[..., None]
        except ValueError as e:
            raise ImageError(str(e)) from None
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = _to_rgb(im, meta)
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def _profile_space(icc: bytes | None) -> str | None:
    """The colour space an ICC profile describes ('RGB', 'GRAY', 'CMYK', ...), None if unreadable."""
    if not icc:
        return None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip()
    except Exception:
        return None


def _to_rgb(im: Image.Image, meta: ImageMeta) -> Image.Image:
    """CMYK (or another colour model) to RGB: through the file's own ICC profile to sRGB when it has one that
    describes its pixels, else Pillow's conversion; the output then carries no profile of the input's space."""
    mode = im.mode
    if mode == "CMYK" and _profile_space(meta.icc_profile) == "CMYK":
        try:
            rgb = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(meta.icc_profile)),
                                            ImageCms.createProfile("sRGB"), outputMode="RGB")
            meta.icc_profile = None  # untagged RGB is read as sRGB
            meta.notes.append("converted from CMYK to sRGB through its ICC profile")
            return rgb
        except Exception:  # a profile littlecms cannot use: the plain conversion below
            pass
    meta.notes.append(f"converted from {mode} to RGB")
    if _profile_space(meta.icc_profile) not in (None, "RGB"):
        meta.icc_profile = None  # a profile of the input's colour model does not describe RGB pixels
    return im.convert("RGB")


def pil_to_array(im: Image.Image) -> tuple[np.ndarray, ImageMeta]:
    """A PIL image already in memory (EXIF orientation applied, metadata kept)."""
    meta = ImageMeta(format=im.format, icc_profile=im.info.get("icc_profile"))
    meta.exif, orientation = _exif_bytes(im)
    arr = _pil_to_array(im, meta)
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    return arr, meta


def array_to_pil(arr: np.ndarray, meta: ImageMeta) -> Image.Image:
    """8-bit PIL image in the mode the input had (L, LA, RGB, RGBA), metadata in ``.info``; ``arr`` float in [0, 1],
    uint8 (taken as is) or uint16."""
    a = to_uint8(arr)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
    im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a, mode=mode)
    if meta.icc_profile:
        im.info["icc_profile"] = meta.icc_profile
    if meta.exif:
        im.info["exif"] = meta.exif
    return im


def to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def to_uint16(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return arr
    if arr.dtype == np.uint8:
        return arr.astype(np.uint16) * 257
    return np.clip(np.rint(arr * 65535.0), 0, 65535).astype(np.uint16)


def _encode(arr: np.ndarray, meta: ImageMeta, ext: str) -> bytes:
    ext = ext.lower().lstrip(".")
    buf = io.BytesIO()
    if meta.bits == 16 and ext == "png":
        a = to_uint16(arr)
        h, w, c = a.shape
        writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16)
        writer.write(buf, a.reshape(h, w * c))
        return _png_add_metadata(buf.getvalue(), meta)
    if ext in ("jpg", "jpeg") and arr.shape[2] in (2, 4):
        arr = arr[..., :-1]  # JPEG has no alpha
        meta.notes.append("alpha dropped: JPEG has no alpha channel")
    im = array_to_pil(arr, meta)
    kw = {}
    if meta.icc_profile:
        kw["icc_profile"] = meta.icc_profile
    if meta.exif and ext in ("jpg", "jpeg", "png", "webp", "tif", "tiff"):
        kw["exif"] = meta.exif
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF",
           "bmp": "BMP"}.get(ext)
    if fmt is None:
        raise ImageError(f"unsupported output extension .{ext} (png, jpg, webp, tif, bmp)")
    if fmt == "JPEG":
        kw["quality"] = 95
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_add_metadata(data: bytes, meta: ImageMeta) -> bytes:
    """Insert the ICC profile (iCCP) and EXIF (eXIf) chunks after IHDR of a PNG pypng wrote (pypng writes neither);
    the chunk layouts are those of the PNG specification, as Pillow writes them for 8-bit files."""
    extra = []
    if meta.icc_profile:
        extra.append((b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(meta.icc_profile)))
    if meta.exif:
        exif = meta.exif[6:] if meta.exif.startswith(b"Exif\x00\x00") else meta.exif
        extra.append((b"eXIf", exif))
    if not extra:
        return data
    chunks = list(png.Reader(bytes=data).chunks())
    out = io.BytesIO()
    png.write_chunks(out, chunks[:1] + extra + chunks[1:])
    return out.getvalue()


PART_PREFIX, PART_SUFFIX = ".mfsr-", ".part"  # a file being written: .mfsr-<writer's pid>-<random>.part
_PART = re.compile(r"^\.mfsr-(?:(\d+)-)?[a-z0-9_]+\.part$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_parts(folder: str) -> list[str]:
    """Remove from ``folder`` the half-written outputs (``.mfsr-*.part``) of writers that are gone (killed); those
    of a live writer and every other file stay. Returns the names removed."""
    gone = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return gone
    for name in names:
        m = _PART.match(name)
        if m and not (m.group(1) and _alive(int(m.group(1)))):
            try:
                os.unlink(os.path.join(folder, name))
                gone.append(name)
            except OSError:
                pass
    return gone


def write_image(path: str, arr: np.ndarray, meta: ImageMeta) -> None:
    """Write atomically (temporary file in the same folder, then rename): a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    data = _encode(arr, meta, os.path.splitext(path)[1] or ".png")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{PART_PREFIX}{os.getpid()}-", suffix=PART_SUFFIX)
    except OSError as e:
        raise ImageError(f"cannot write to {folder}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        apply_umask(tmp)  # the permissions an ordinary open() would give, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not silently grey pixels
