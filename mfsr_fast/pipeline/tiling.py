"""Tiled upscaling in bounded memory: rows of tiles in, finished output rows out, top to bottom.

Peak memory is the model, one row of tiles and the output array (uint8 / uint16 for images), not a float copy of
the whole output: every piece here works on a band of rows and hands finished rows on (to ``rows.RowSink``).
- ``noise_window``: the starting noise of any window of the latent, drawn per 64 x 64 block from (seed, image,
  block row, block column), so a tile's noise needs no full-size field and the noise does not depend on the tile
  size.
- ``RestoredRows``: R(LR) band by band, each band computed exactly as the whole image would be (the restorer's own
  tiles, ``Restorer.rows``), held in float16 (as training pools hold it) and only while tiles need it.
- ``tile_rows``: runs the model tile by tile (raised-cosine blending where tiles overlap) and yields each output row
  once, as soon as no later tile touches it.
- ``auto_tile`` / ``auto_tile_batch``: the tile side and the tiles per model call, from the free memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from mfsr_fast.models.codec import VAECodec
from mfsr_fast.models.conditioning import SCALE

NOISE_BLOCK = 64  # latent cells per side of one independently seeded noise block
# R(LR) as held between the restorer and the model: float16, as training pools store it (training.pool). Half of
# float32's memory; in [0, 1] its rounding is at most 2^-12, a sixteenth of an 8-bit level.
RESTORED_DTYPE = torch.float16


def _block_seed(seed: int, index: int, by: int, bx: int) -> int:
    state = np.random.SeedSequence([seed % 2**63, index, by, bx]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def noise_window(seed: int, index: int, channels: int, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """(channels, h, w) standard normal noise of the window at latent (y0, x0) of image ``index`` for ``seed``: the
    same values whatever window they are read through."""
    nb = NOISE_BLOCK
    out = torch.empty(channels, h, w)
    for by in range(y0 // nb, (y0 + h - 1) // nb + 1):
        for bx in range(x0 // nb, (x0 + w - 1) // nb + 1):
            g = torch.Generator().manual_seed(_block_seed(seed, index, by, bx))
            block = torch.randn(channels, nb, nb, generator=g)
            ya, yb = max(y0, by * nb), min(y0 + h, (by + 1) * nb)
            xa, xb = max(x0, bx * nb), min(x0 + w, (bx + 1) * nb)
            out[:, ya - y0:yb - y0, xa - x0:xb - x0] = block[:, ya - by * nb:yb - by * nb, xa - bx * nb:xb - bx * nb]
    return out


def noise_batch(seed: int, channels: int, y0: int, x0: int, h: int, w: int, batch: int) -> torch.Tensor:
    return torch.stack([noise_window(seed, b, channels, y0, x0, h, w) for b in range(batch)])


class RestoredRows:
    """R(rgb) rows on demand, for requests that move down the image: bands of the restorer's own tile height are
    computed when first needed and dropped once requests have moved past them. Requests are in the coordinates of
    the image padded to ``padded`` (Hp, Wp) LR pixels: R runs on the unpadded image (as it would on the whole
    image) and its rows are padded at x ``scale`` the way the LR was (``mode``: reflect or replicate). ``full``:
    R(rgb) already computed (then rows are taken from it the same way). Rows are held, and given, in
    ``RESTORED_DTYPE``."""

    def __init__(self, restorer, rgb: torch.Tensor, scale: int, full: torch.Tensor | None = None,
                 padded: tuple[int, int] | None = None, mode: str = "reflect"):
        self.restorer, self.rgb, self.s = restorer, rgb, scale
        self.full = full.to(RESTORED_DTYPE) if full is not None else None
        H, W = rgb.shape[-2:]
        self.padded, self.mode = padded or (H, W), mode
        self.band = restorer.row_band(H, W) if full is None else H
        self.bands: list[tuple[int, torch.Tensor]] = []  # (first LR row, R's rows) of the bands held, in order

    def _ensure(self, y0: int, y1: int) -> None:
        """Hold R's rows for LR rows [y0, y1) of the unpadded image (y0 only grows between calls): bands wholly
        above y0 are dropped, missing ones computed. Bands are kept apart (never concatenated), so that what is held
        is at most one band and the rows of the one above that requests still reach."""
        H, s = self.rgb.shape[-2], self.s
        self.bands = [(b0, r) for b0, r in self.bands if b0 + r.shape[2] // s > y0]
        b1 = self.bands[-1][0] + self.bands[-1][1].shape[2] // s if self.bands else y0 - y0 % self.band
        while b1 < y1:
            # Before the next band: of the bands held, only the rows from y0 on are kept (a copy, so the band goes).
            self.bands = [(y0, r[:, :, s * (y0 - b0):].clone()) if y0 > b0 else (b0, r) for b0, r in self.bands]
            self.bands.append((b1, self.restorer.rows(self.rgb, b1, min(H, b1 + self.band), RESTORED_DTYPE)))
            b1 += self.band

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """R's HR rows ``rows`` (in any order, within the bands held): a view when they are a run of one band's."""
        s, bands = self.s, [(0, self.full)] if self.full is not None else self.bands
        a, n = int(rows[0]), len(rows)
        if torch.equal(rows, torch.arange(a, a + n)):
            for b0, r in bands:
                if s * b0 <= a and a + n <= s * b0 + r.shape[2]:
                    return r[:, :, a - s * b0:a - s * b0 + n]
        first = bands[0][1]
        out = first.new_empty(first.shape[0], first.shape[1], len(rows), first.shape[3])
        for b0, r in bands:
            sel = (rows >= s * b0) & (rows < s * b0 + r.shape[2])
            if sel.any():
                out[:, :, sel] = r[:, :, rows[sel] - s * b0]
        return out

    def __call__(self, y0: int, y1: int) -> torch.Tensor:
        """R's HR rows for LR rows [y0, y1) of the padded image, (B, 3, s (y1 - y0), s Wp): to be read, not written
        (often a view of a band held)."""
        s, (H, W), Wp = self.s, self.rgb.shape[-2:], self.padded[1]
        rows = torch.arange(s * y0, s * y1)
        if y1 > H:  # padding rows: mirrored (or repeated) HR rows of R, as F.pad would give
            last = s * H - 1
            rows = torch.where(rows > last, 2 * last - rows if self.mode == "reflect" else torch.full_like(rows, last),
                               rows)
        if self.full is None:
            self._ensure(min(y0, int(rows.min()) // s), int(rows.max()) // s + 1)
        out = self._gather(rows)
        if Wp > W:
            out = torch.nn.functional.pad(out, (0, s * (Wp - W), 0, 0), mode=self.mode)
        return out


def window(n: int, left: int, right: int, device) -> torch.Tensor:
    """1-D blending weights: raised-cosine ramps of the given lengths at each end, 1 in between."""
    w = torch.ones(n, device=device)
    if left > 0:
        w[:left] = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(left, device=device) + 0.5) / left)
    if right > 0:
        w[n - right:] = 0.5 + 0.5 * torch.cos(math.pi * (torch.arange(right, device=device) + 0.5) / right)
    return w


def starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    return sorted(set(list(range(0, size - tile, step)) + [size - tile]))


def tile_grid(H: int, W: int, tile: int, overlap: int | None, multiple: int) -> tuple[list[int], list[int], int, int]:
    """(row starts, column starts, tile height, tile width) covering an H x W image with tiles of side ``tile`` (a
    multiple of ``multiple``) overlapping by ``overlap`` (default: an eighth of a tile, at least 8)."""
    tile = max(8 * multiple, tile - tile % multiple)
    if H <= tile and W <= tile:
        return [0], [0], H, W
    ov = overlap if overlap is not None else max(8, tile // 8)
    ov = min(ov - ov % multiple, tile // 2)
    th, tw = min(tile, H), min(tile, W)
    return starts(H, th, ov), starts(W, tw, ov), th, tw


def tile_rows(run: Callable, rgb: torch.Tensor, *, scale: int, cells_per_px: float, channels: int, seed: int,
              tile: int, overlap: int, multiple: int, group: int = 1,
              restored: Callable[[int, int], torch.Tensor] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (r0, rows) with rows (B, 3, n, scale W) the finished output rows [r0, r0 + n), top to bottom, each once.

    ``run(lr, noise, restored) -> (B', 3, scale h, scale w)`` upscales a batch of tiles; ``restored(y0, y1)`` gives
    R(LR) rows for LR rows [y0, y1) (restorer-conditioned models). Memory: one row of tiles and its blend."""
    B, _, H, W = rgb.shape
    s, dev = scale, rgb.device
    ys, xs, th, tw = tile_grid(H, W, tile, overlap, multiple)
    count = [0, len(ys) * len(xs)]  # tiles done, in all
    acc = wsum = None
    top_row = 0  # output row where acc starts
    for i, y in enumerate(ys):
        # R's rows first, while the blend buffer holds only the rows carried from the previous tile row.
        rrows = restored(y, y + th) if restored is not None else None
        # Extend the blend buffer to this tile row's reach (rows above it are carried from the previous row).
        need = s * (y + th) - top_row
        if acc is None:
            acc = torch.zeros(B, 3, need, s * W, device=dev)
            wsum = torch.zeros(1, 1, need, s * W, device=dev)
        elif acc.shape[2] < need:
            extra = need - acc.shape[2]
            acc = torch.cat([acc, acc.new_zeros(B, 3, extra, s * W)], dim=2)
            wsum = torch.cat([wsum, wsum.new_zeros(1, 1, extra, s * W)], dim=2)
        top = s * (ys[i - 1] + th - y) if i > 0 else 0
        bottom = s * (y + th - ys[i + 1]) if i + 1 < len(ys) else 0
        band = _Band(rgb, y, th, tw, xs, s, window(s * th, top, bottom, dev), s * y - top_row)
        band.run(run, acc, wsum, rrows, (seed, channels, cells_per_px), max(1, group // B), count, progress)
        del rrows
        # Rows above the next tile row are final.
        final = s * ys[i + 1] - top_row if i + 1 < len(ys) else acc.shape[2]
        yield top_row, acc[:, :, :final].div_(wsum[:, :, :final].clamp_min(1e-8))  # in place: no second band
        acc, wsum = acc[:, :, final:].clone(), wsum[:, :, final:].clone()  # a copy: the finished rows' memory goes
        top_row += final


class _Band:
    """One row of tiles: LR rows [y, y + th) at the column starts ``xs``, blended into the buffers at row ``r0``."""

    def __init__(self, rgb, y: int, th: int, tw: int, xs: list[int], s: int, wy: torch.Tensor, r0: int):
        self.rgb, self.y, self.th, self.tw, self.xs, self.s, self.wy, self.r0 = rgb, y, th, tw, xs, s, wy, r0

    def run(self, run: Callable, acc, wsum, rrows, noise_spec, per_call: int, count: list[int], progress) -> None:
        """Upscale the band's tiles ``per_call`` at a time and blend each into ``acc`` / ``wsum``."""
        seed, channels, cells_per_px = noise_spec
        rgb, y, th, tw, s = self.rgb, self.y, self.th, self.tw, self.s
        B, dev = rgb.shape[0], rgb.device
        ny, nh = int(y * cells_per_px), int(th * cells_per_px)
        for k in range(0, len(self.xs), per_call):
            chunk = self.xs[k:k + per_call]
            lrs, noises, rs = [], [], []
            for x in chunk:
                nx, nw = int(x * cells_per_px), int(tw * cells_per_px)
                lrs.append(rgb[:, :, y:y + th, x:x + tw])
                noises.append(noise_batch(seed, channels, ny, nx, nh, nw, B).to(dev))
                if rrows is not None:
                    rs.append(rrows[:, :, :, s * x:s * (x + tw)])
            outs = run(torch.cat(lrs), torch.cat(noises), torch.cat(rs).float() if rs else None).split(B)
            for x, out in zip(chunk, outs):
                self._blend(acc, wsum, x, out)
                count[0] += 1
                if progress:
                    progress(count[0], count[1])

    def _blend(self, acc, wsum, x: int, out: torch.Tensor) -> None:
        s, tw, xs, r0, th = self.s, self.tw, self.xs, self.r0, self.th
        j = xs.index(x)
        left = s * (xs[j - 1] + tw - x) if j > 0 else 0
        right = s * (x + tw - xs[j + 1]) if j + 1 < len(xs) else 0
        w = (self.wy[:, None] * window(s * tw, left, right, acc.device)[None, :])[None, None]
        acc[:, :, r0:r0 + s * th, s * x:s * (x + tw)] += out.float() * w
        wsum[:, :, r0:r0 + s * th, s * x:s * (x + tw)] += w


# Tile sizes from the free memory.


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's own count, or the system's available memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 2 * 2**30
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except OSError:
            pass
    return free


def tile_memory(model, codec, tile: int) -> int:
    """Estimated working memory (bytes) of one LR tile of side ``tile``: model activations and the decoder's."""
    cfg = model.cfg
    lat = SCALE / codec.factor  # latent cells per LR pixel
    tokens = 2 * (int(tile * lat) // cfg.patch_size) ** 2  # HR and LR streams
    est = tokens * cfg.num_heads * cfg.head_dim * 4 * 40 + (SCALE * tile) ** 2 * 3 * 4 * 8
    if isinstance(codec, VAECodec):  # the VAE decoder's full-resolution activations (128 channels, fp32)
        est += (SCALE * tile) ** 2 * 128 * 4 * 6
    return est


def auto_tile(model, codec, device: torch.device) -> int:
    """LR tile side: the model's native size (``sample_size``, the latent side its positions are scaled for and its
    training crops had: a small model's samples drift with the token count), or less when its estimated working
    memory would not fit in a quarter of the free memory."""
    free = free_memory(device)
    native = max(32, int(model.cfg.sample_size / (SCALE / codec.factor)))
    for tile in (512, 384, 256, 192, 128, 96, 64, 32):
        if tile <= native and tile_memory(model, codec, tile) < free / 4:
            return tile
    return 32


CPU_TILE_BATCH = 8  # tiles per model call on a CPU: fewer, larger calls (docs/results/speed-and-memory.md)


def auto_tile_batch(model, codec, device: torch.device, tile: int) -> int:
    """Tiles per model call: as many as a quarter of the free memory holds, up to 64 on a GPU (one call per small
    tile leaves it waiting on the host) and CPU_TILE_BATCH on a CPU (fewer calls of larger matrices)."""
    cap = 64 if device.type == "cuda" else CPU_TILE_BATCH
    return int(max(1, min(cap, free_memory(device) / 4 // max(1, tile_memory(model, codec, tile)))))
