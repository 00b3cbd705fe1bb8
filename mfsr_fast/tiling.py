"""Tiled upscaling in bounded memory: rows of tiles in, finished output rows out, top to bottom.

Peak memory is the model, one row of tiles and the output array (uint8 / uint16 for images), not a float copy of
the whole output: every piece below works on a band of rows and hands finished rows on.
- ``noise_window``: the starting noise of any window of the latent, drawn per 64 x 64 block from (seed, image,
  block row, block column), so a tile's noise needs no full-size field and the result does not depend on the tile
  size.
- ``RestoredRows``: R(LR) band by band, each band computed exactly as the whole image would be (the restorer's own
  tiles, ``Restorer.rows``), kept only while tiles need it.
- ``tile_rows``: runs the model tile by tile (raised-cosine blending where tiles overlap) and yields each output row
  once, as soon as no later tile touches it.
- ``RowSink``: colour fix (wavelet: a band plus the 64-row reach of its blur), the resize to other scales (separable
  bicubic taps, antialiased when shrinking), grey / alpha channels and the conversion to the output dtype, written
  into the output array as rows arrive. The 'adain' colour fix matches image-wide statistics, so it holds the whole
  float output (the one option whose memory grows with the image).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mfsr_fast.codec import VAECodec
from mfsr_fast.guidance import TeacherSampling, sample_teacher
from mfsr_fast.loading import MODEL_SCALE, codec_of, restorer_of
from mfsr_fast.meanflow import StudentSampling, flat_weight, sample
from mfsr_fast.model import MFSRTransformer

NOISE_BLOCK = 64  # latent cells per side of one independently seeded noise block
WAVELET_REACH = 64  # rows the wavelet colour fix's blur reaches (5 levels of a 5-tap kernel: 2 * (1 + ... + 16) = 62)


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
    R(rgb) already computed (then rows are taken from it the same way)."""

    def __init__(self, restorer, rgb: torch.Tensor, scale: int, full: torch.Tensor | None = None,
                 padded: tuple[int, int] | None = None, mode: str = "reflect"):
        self.restorer, self.rgb, self.s, self.full = restorer, rgb, scale, full
        H, W = rgb.shape[-2:]
        self.padded, self.mode = padded or (H, W), mode
        self.band = restorer.row_band(H, W) if full is None else H
        self.c0 = self.c1 = 0  # LR rows [c0, c1) of R held in self.held
        self.held = None

    def _ensure(self, y0: int, y1: int) -> None:
        """Hold R's rows for LR rows [y0, y1) of the unpadded image (y0 only grows between calls)."""
        s, H = self.s, self.rgb.shape[-2]
        if self.full is not None:
            return
        if self.held is not None and y0 > self.c0:  # drop what no later request needs
            self.held = self.held[:, :, s * (y0 - self.c0):]
            self.c0 = y0
        while self.c1 < y1:
            b0, b1 = self.c1, min(H, self.c1 + self.band)
            new = self.restorer.rows(self.rgb, b0, b1).float()
            if self.held is None:
                self.held, self.c0 = new, b0
            else:
                self.held = torch.cat([self.held, new], dim=2)
            self.c1 = b1

    def __call__(self, y0: int, y1: int) -> torch.Tensor:
        s, (H, W), Wp = self.s, self.rgb.shape[-2:], self.padded[1]
        rows = torch.arange(s * y0, s * y1)
        if y1 > H:  # padding rows: mirrored (or repeated) HR rows of R, as F.pad would give
            last = s * H - 1
            rows = torch.where(rows > last, 2 * last - rows if self.mode == "reflect" else torch.full_like(rows, last),
                               rows)
        lo, hi = int(rows.min()) // s, int(rows.max()) // s + 1
        self._ensure(min(lo, y0), hi)
        src, base = (self.full, 0) if self.full is not None else (self.held, s * self.c0)
        out = src[:, :, rows - base]
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


def tile_rows(run: Callable, rgb: torch.Tensor, *, scale: int, cells_per_px: float, channels: int, seed: int,
              tile: int, overlap: int, multiple: int, group: int = 1,
              restored: Callable[[int, int], torch.Tensor] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (r0, rows) with rows (B, 3, n, scale W) the finished output rows [r0, r0 + n), top to bottom, each once.

    ``run(lr, noise, restored) -> (B', 3, scale h, scale w)`` upscales a batch of tiles; ``restored(y0, y1)`` gives
    R(LR) rows for LR rows [y0, y1) (restorer-conditioned models). Memory: one row of tiles and its blend."""
    B, _, H, W = rgb.shape
    s, dev = scale, rgb.device
    tile = max(8 * multiple, tile - tile % multiple)
    if H <= tile and W <= tile:
        ys, xs, th, tw = [0], [0], H, W
    else:
        ov = overlap if overlap is not None else max(8, tile // 8)
        ov = min(ov - ov % multiple, tile // 2)
        th, tw = min(tile, H), min(tile, W)
        ys, xs = starts(H, th, ov), starts(W, tw, ov)
    total, done = len(ys) * len(xs), 0
    per_call = max(1, group // B)
    acc = wsum = None
    top_row = 0  # output row where acc starts
    for i, y in enumerate(ys):
        # Extend the blend buffer to this tile row's reach (rows above it are carried from the previous row).
        need = s * (y + th) - top_row
        if acc is None:
            acc = torch.zeros(B, 3, need, s * W, device=dev)
            wsum = torch.zeros(1, 1, need, s * W, device=dev)
        elif acc.shape[2] < need:
            extra = need - acc.shape[2]
            acc = torch.cat([acc, acc.new_zeros(B, 3, extra, s * W)], dim=2)
            wsum = torch.cat([wsum, wsum.new_zeros(1, 1, extra, s * W)], dim=2)
        rrows = restored(y, y + th) if restored is not None else None
        top = s * (ys[i - 1] + th - y) if i > 0 else 0
        bottom = s * (y + th - ys[i + 1]) if i + 1 < len(ys) else 0
        wy = window(s * th, top, bottom, dev)
        ny, nh = int(y * cells_per_px), int(th * cells_per_px)
        for k in range(0, len(xs), per_call):
            chunk = xs[k:k + per_call]
            lrs, noises, rs = [], [], []
            for x in chunk:
                nx, nw = int(x * cells_per_px), int(tw * cells_per_px)
                lrs.append(rgb[:, :, y:y + th, x:x + tw])
                noises.append(noise_batch(seed, channels, ny, nx, nh, nw, B).to(dev))
                if rrows is not None:
                    rs.append(rrows[:, :, :, s * x:s * (x + tw)])
            outs = run(torch.cat(lrs), torch.cat(noises), torch.cat(rs) if rs else None).split(B)
            for x, out in zip(chunk, outs):
                j = xs.index(x)
                left = s * (xs[j - 1] + tw - x) if j > 0 else 0
                right = s * (x + tw - xs[j + 1]) if j + 1 < len(xs) else 0
                w = (wy[:, None] * window(s * tw, left, right, dev)[None, :])[None, None]
                r0 = s * y - top_row
                acc[:, :, r0:r0 + s * th, s * x:s * (x + tw)] += out.float() * w
                wsum[:, :, r0:r0 + s * th, s * x:s * (x + tw)] += w
                done += 1
                if progress:
                    progress(done, total)
        # Rows above the next tile row are final.
        final = s * ys[i + 1] - top_row if i + 1 < len(ys) else acc.shape[2]
        yield top_row, acc[:, :, :final].div_(wsum[:, :, :final].clamp_min(1e-8))  # in place: no second band
        acc, wsum = acc[:, :, final:], wsum[:, :, final:]
        top_row += final


def resize_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight), each (n_out, K): output sample i = sum_k weight[i, k] * input[index[i, k]]. Bicubic (Keys,
    a = -0.5), antialiased when shrinking (the kernel widened by n_in / n_out), edges mirrored; pixel centres
    aligned (output i sits at (i + 0.5) n_in / n_out - 0.5)."""
    ratio = n_out / n_in
    support = 2.0 / ratio if ratio < 1 else 2.0
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) / ratio - 0.5
    left = torch.floor(centre - support) + 1
    K = int(math.ceil(2 * support)) + 1
    idx = left[:, None] + torch.arange(K, dtype=torch.float64)[None, :]
    d = (centre[:, None] - idx).abs() * (ratio if ratio < 1 else 1.0)
    w = torch.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1,
                    torch.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, torch.zeros_like(d)))
    w = w / w.sum(dim=1, keepdim=True)
    period = 2 * n_in
    m = torch.remainder(idx.long(), period)
    idx = torch.where(m < n_in, m, period - 1 - m)  # mirror: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
    return idx, w.float()


def _resize_cols(x: torch.Tensor, taps) -> torch.Tensor:
    idx, w = taps
    out = None
    for k in range(idx.shape[1]):
        term = x[..., idx[:, k]] * w[:, k]
        out = term if out is None else out + term
    return out


class RowSink:
    """Takes the model's x4 output rows (1, 3, n, 4W) in order and writes finished rows of the final image into
    ``out`` (oh, ow, C) (uint8, uint16 or float32): colour fix against ``lr`` (1, 3, H, W), resize to (oh, ow),
    greyscale (C in 1, 2) and alpha (``alpha`` (H, W) float, resized from the LR alpha), rounding."""

    def __init__(self, out: np.ndarray, lr: torch.Tensor, *, scale: int, color_fix: str | None, grey: bool,
                 alpha: np.ndarray | None, fix: Callable | None = None, bicubic: Callable | None = None):
        self.out, self.lr, self.s = out, lr, scale
        self.method, self.grey, self.alpha = color_fix, grey, alpha
        self.fix, self.bicubic = fix, bicubic
        H, W = lr.shape[-2:]
        self.mh, self.mw = scale * H, scale * W  # model output size
        oh, ow = out.shape[:2]
        self.resize = (oh, ow) != (self.mh, self.mw)
        if self.resize:
            self.vt, self.ht = resize_taps(self.mh, oh), resize_taps(self.mw, ow)
            # The last model row each output row reads: output rows go out once that row is in.
            self.vlast = self.vt[0].max(dim=1).values
        if alpha is not None:
            self.alpha_v, self.alpha_h = resize_taps(H, oh), resize_taps(W, ow)
        self.reach = WAVELET_REACH if color_fix == "wavelet" else 0
        self.buf, self.b0 = None, 0  # model rows [b0, b0 + len) not yet colour-fixed and passed on
        self.fixed, self.f0 = None, 0  # colour-fixed model rows [f0, ...) kept for the resize
        self.emitted = 0  # colour-fixed rows passed on
        self.written = 0  # output rows written
        self.whole = [] if color_fix == "adain" else None

    def push(self, r0: int, rows: torch.Tensor) -> None:
        rows = rows.float()
        if self.whole is not None:  # adain: image-wide statistics
            self.whole.append(rows)
            if r0 + rows.shape[2] == self.mh:
                full = torch.cat(self.whole, dim=2)
                self.whole = None
                self._fixed_rows(0, self.fix(full, self.bicubic(self.lr.float(), (self.mh, self.mw)), "adain"))
            return
        self.buf = rows if self.buf is None else torch.cat([self.buf, rows], dim=2)
        have = self.b0 + self.buf.shape[2]
        upto = self.mh if have == self.mh else have - self.reach
        if upto > self.emitted:
            self._colour(upto)

    def _ref_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the bicubic x4 of the LR, computed from an LR band with 3 rows of context."""
        s, H = self.s, self.lr.shape[-2]
        l0, l1 = max(0, a // s - 3), min(H, -(-b // s) + 3)
        band = self.bicubic(self.lr[:, :, l0:l1].float(), (s * (l1 - l0), self.mw))
        return band[:, :, a - s * l0:b - s * l0]

    def _colour(self, upto: int) -> None:
        e0 = self.emitted
        if self.method == "wavelet":
            a = max(self.b0, e0 - self.reach)
            b = min(self.mh, upto + self.reach, self.b0 + self.buf.shape[2])
            seg = self.buf[:, :, a - self.b0:b - self.b0]
            fixed = self.fix(seg, self._ref_rows(a, b), "wavelet")[:, :, e0 - a:upto - a]
        else:
            fixed = self.buf[:, :, e0 - self.b0:upto - self.b0]
        self.emitted = upto
        keep = max(self.b0, upto - self.reach)  # rows the next colour fix still reads
        self.buf = self.buf[:, :, keep - self.b0:]
        self.b0 = keep
        self._fixed_rows(e0, fixed)

    def _fixed_rows(self, r0: int, rows: torch.Tensor) -> None:
        if not self.resize:
            self._write(r0, rows)
            return
        self.fixed = rows if self.fixed is None else torch.cat([self.fixed, rows], dim=2)
        have = self.f0 + self.fixed.shape[2]
        o1 = int((self.vlast < have).sum()) if have < self.mh else self.out.shape[0]
        o0 = self.written
        if o1 <= o0:
            return
        idx, w = self.vt[0][o0:o1] - self.f0, self.vt[1][o0:o1]
        col = None
        for k in range(idx.shape[1]):
            term = self.fixed[:, :, idx[:, k]] * w[:, k][None, None, :, None]
            col = term if col is None else col + term
        self._write(o0, _resize_cols(col, self.ht))
        if o1 < self.out.shape[0]:
            first = int(self.vt[0][o1:].min())  # rows later outputs still read
            self.fixed = self.fixed[:, :, first - self.f0:]
            self.f0 = first

    def _write(self, o0: int, rows: torch.Tensor, chunk: int = 64) -> None:
        for k in range(0, rows.shape[2], chunk):  # chunks: the conversion's temporaries stay small
            self._write_chunk(o0 + k, rows[:, :, k:k + chunk])

    def _write_chunk(self, o0: int, rows: torch.Tensor) -> None:
        a = rows[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (n, ow, 3)
        if self.grey:
            a = a.mean(axis=2, keepdims=True)
        n = a.shape[0]
        if self.alpha is not None:
            idx, w = self.alpha_v[0][o0:o0 + n], self.alpha_v[1][o0:o0 + n]
            al = torch.from_numpy(self.alpha)
            col = sum(al[idx[:, k]] * w[:, k, None] for k in range(idx.shape[1]))
            al = _resize_cols(col, self.alpha_h).clamp(0, 1).numpy()[..., None]
            a = np.concatenate([a, al], axis=2)
        o = self.out
        if o.dtype == np.uint8:
            o[o0:o0 + n] = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
        elif o.dtype == np.uint16:
            o[o0:o0 + n] = np.clip(np.rint(a * 65535), 0, 65535).astype(np.uint16)
        else:
            o[o0:o0 + n] = a
        self.written = o0 + n

    def done(self) -> bool:
        return self.written == self.out.shape[0]


# Running a model over tiles: its conditioning (the LR stream's input), one tile's sampling (MeanFlow steps, or the
# teacher's Euler steps with guidance), tile sizes from free memory, and the rows generator upscale_rgb and
# upscale_array consume.


def _bicubic(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def lr_condition(model: MFSRTransformer, codec, lr: torch.Tensor, restored: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The LR stream's input for LR images (B, 3, h, w) in [0, 1], encoded by ``codec``: the bicubic upsampling x4,
    R(LR) (``restored``, (B, 3, 4h, 4w) in [0, 1]) or both concatenated, as the model's ``lr_source`` says."""
    source = model.cfg.lr_source
    if source == "bicubic":
        return codec.encode(_bicubic(lr, (MODEL_SCALE * lr.shape[-2], MODEL_SCALE * lr.shape[-1])))
    if restored is None or restored.shape[-2:] != (MODEL_SCALE * lr.shape[-2], MODEL_SCALE * lr.shape[-1]):
        raise ValueError(f"lr_source {source!r} needs R(LR) at x{MODEL_SCALE} the LR size")
    c = codec.encode(restored)
    if source == "restorer":
        return c
    return torch.cat([c, codec.encode(_bicubic(lr, restored.shape[-2:]))], dim=1)


@torch.inference_mode()
def _sr_tile(model: MFSRTransformer, lr: torch.Tensor, noise: torch.Tensor, steps: int,
             teacher_guidance: float | TeacherSampling | None = None, restored: torch.Tensor | None = None,
             student_sampling: StudentSampling | None = None) -> torch.Tensor:
    """lr (B, 3, h, w) in [0, 1], h and w multiples of ``_lr_multiple``; noise (B, C, 4h / f, 4w / f) in the codec's
    space; ``restored`` R(lr) (B, 3, 4h, 4w) for restorer-conditioned models: -> (B, 3, 4h, 4w). A student takes
    MeanFlow jumps (``student_sampling``, default the model's own: ``StudentSampling.of(model.cfg)``); with
    ``teacher_guidance`` (a weight w or a ``TeacherSampling``) the model is sampled as a teacher
    (Euler steps of the guided velocity).
    The flow runs in the model's space (``to_flow``: a scaled residual over R(LR) for residual models); a student's
    ``detail`` below 1 scales that residual before it is added back. A ``flat_detail`` below 1 (a student's sampling or
    a ``TeacherSampling``'s) composes the decoded output with R(LR) where R(LR) is flat (``meanflow.flat_weight``)."""
    codec = codec_of(model)
    B = lr.shape[0]
    dtype = next(model.parameters()).dtype
    c = lr_condition(model, codec, lr, restored).to(dtype)
    flat = 1.0
    if teacher_guidance is not None:
        y = sample_teacher(model, c, noise.to(dtype), steps=steps, guidance=teacher_guidance)
        flat = getattr(teacher_guidance, "flat_detail", 1.0)
    else:
        ctx, pooled = model.prompt("positive", B)
        calls = itertools.count()

        def fn(z, t, r):
            # Every other step sees the token grid moved by half a patch: patch-edge errors of one step then fall
            # inside the next step's patches instead of adding up on one grid (benchmarks/RESULTS.md, "multi-step
            # patch grid"). The first step is unmoved, so one step is unchanged.
            shift = (next(calls) % 2) * (model.cfg.patch_size // 2)
            return shifted_call(lambda zz, cc: model.field(zz, cc, t.expand(B), r.expand(B), ctx, pooled), z, c,
                                shift, model.cfg.patch_size)

        how = student_sampling or StudentSampling.of(model.cfg)
        y = sample(fn, noise.to(dtype), timesteps=how.grid(steps, device=noise.device), jump=how.jump)
        if how.detail != 1:  # base + detail (output - base): upscale_rgb checked that the model has a base
            y = y * how.detail
        flat = how.flat_detail
    out = codec.decode(model.from_flow(y, c).float()).clamp(0, 1)
    if flat != 1:  # likewise, with R(LR) (checked: a restorer-conditioned model), in pixels, where R is flat
        base = restored.to(out)
        out = (base + flat_weight(base, flat) * (out - base)).clamp(0, 1)
    return out


def shifted_call(f, z: torch.Tensor, c: torch.Tensor, shift: int, patch: int) -> torch.Tensor:
    """``f(z, c)`` with the patch grid moved by ``shift`` latent cells (0 <= shift < patch) down and right: both
    inputs padded by reflection (``shift`` before, ``patch - shift`` after, so the size stays whole patches), the
    output cropped back. ``shift = 0`` is ``f(z, c)`` itself."""
    if shift == 0:
        return f(z, c)
    if not 0 < shift < patch:
        raise ValueError(f"shift must be in [0, {patch}), got {shift}")
    pad = (shift, patch - shift, shift, patch - shift)
    out = f(F.pad(z, pad, mode="reflect"), F.pad(c, pad, mode="reflect"))
    return out[:, :, shift:shift + z.shape[-2], shift:shift + z.shape[-1]]


def _lr_multiple(model: MFSRTransformer) -> int:
    """LR sizes must be multiples of this so that the latent is whole patches: patch x codec factor / 4."""
    return max(1, model.cfg.patch_size * codec_of(model).factor // MODEL_SCALE)


def _free_memory(device: torch.device) -> int:
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


def _tile_memory(model: MFSRTransformer, tile: int) -> int:
    """Estimated working memory (bytes) of one LR tile of side ``tile``: model activations and the decoder's."""
    cfg = model.cfg
    codec = codec_of(model)
    lat = MODEL_SCALE / codec.factor  # latent cells per LR pixel
    tokens = 2 * (int(tile * lat) // cfg.patch_size) ** 2  # HR and LR streams
    est = tokens * cfg.num_heads * cfg.head_dim * 4 * 40 + (MODEL_SCALE * tile) ** 2 * 3 * 4 * 8
    if isinstance(codec, VAECodec):  # the VAE decoder's full-resolution activations (128 channels, fp32)
        est += (MODEL_SCALE * tile) ** 2 * 128 * 4 * 6
    return est


def auto_tile(model: MFSRTransformer, device: torch.device) -> int:
    """LR tile side: the model's native size (``sample_size``, the latent side its positions are scaled for; the
    ``tiny`` recipes train on half that side, and 16 px tiles measured no better for the default: RESULTS.md), or
    less when its estimated working memory would not fit in a quarter of the free memory. Measured on the tiny
    default (128 px DRealSR LR, CPU): tiles of 32 gave 33.26 dB / NIQE 6.81 in 9 s, the whole image 33.06 dB /
    6.33 in 14 s."""
    free = _free_memory(device)
    native = max(32, int(model.cfg.sample_size / (MODEL_SCALE / codec_of(model).factor)))
    for tile in (512, 384, 256, 192, 128, 96, 64, 32):
        if tile <= native and _tile_memory(model, tile) < free / 4:
            return tile
    return 32


def auto_tile_batch(model: MFSRTransformer, device: torch.device, tile: int) -> int:
    """Tiles per model call: on a GPU as many as a quarter of the free memory holds (up to 64), since one call per
    small tile leaves the GPU waiting on the host; 1 on the CPU, where batching gains little and costs memory."""
    if device.type != "cuda":
        return 1
    return int(max(1, min(64, _free_memory(device) / 4 // max(1, _tile_memory(model, tile)))))


def _prepare(model: MFSRTransformer, rgb: torch.Tensor, restored: torch.Tensor | None):
    """Pad ``rgb`` to whole latent patches by reflection (replicate where a side is too short to reflect) and give
    the R(LR) row source of a restorer-conditioned model (None for the others): R of the unpadded image (or the
    given ``restored``), padded at x4 the same way."""
    B, _, H, W = rgb.shape
    s = MODEL_SCALE
    if restored is not None and restored.shape != (B, 3, s * H, s * W):
        raise ValueError(f"restored must be (B, 3, 4H, 4W) = {(B, 3, s * H, s * W)}, got {tuple(restored.shape)}")
    m = _lr_multiple(model)
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    mode = "reflect" if Hp - H < H and Wp - W < W else "replicate"
    rows = None
    if model.needs_restorer:
        full = restored.to(device=rgb.device, dtype=torch.float32) if restored is not None else None
        rows = RestoredRows(restorer_of(model), rgb, s, full=full, padded=(Hp, Wp), mode=mode)
    if (Hp, Wp) != (H, W):
        rgb = F.pad(rgb, (0, Wp - W, 0, Hp - H), mode=mode)
    return rgb, rows


def _rows(model: MFSRTransformer, rgb: torch.Tensor, *, steps: int, seed: int, tile: int | None, overlap: int | None,
          progress, teacher_guidance: float | TeacherSampling | None, tile_batch: int | None,
          restored: torch.Tensor | None, student_sampling: StudentSampling | None = None):
    """The rows generator of the padded image's x4 output: see ``tiling.tile_rows``."""
    device = rgb.device
    codec = codec_of(model)
    rgb, rrows = _prepare(model, rgb, restored)
    tile = tile or auto_tile(model, device)
    group = tile_batch or auto_tile_batch(model, device, tile)

    def run(lr, noise, r):
        return _sr_tile(model, lr, noise, steps, teacher_guidance, r, student_sampling)

    return tile_rows(run, rgb, scale=MODEL_SCALE, cells_per_px=MODEL_SCALE / codec.factor,
                     channels=codec.latent_channels, seed=seed, tile=tile, overlap=overlap,
                     multiple=_lr_multiple(model), group=group, restored=rrows, progress=progress)
