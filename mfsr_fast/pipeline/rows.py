"""Finished rows of the model's x4 output into the final image: colour fix, resize, grey / alpha, rounding.

``RowSink`` takes the rows ``tiling.tile_rows`` hands on, in order, and writes the final image's rows into the output
array as soon as they are final: the wavelet colour fix needs a band plus the 64-row reach of its blur, the resize to
other scales (separable bicubic taps, antialiased when shrinking) the few rows its taps read. The 'adain' colour fix
matches image-wide statistics, so it holds the whole float output (the one option whose memory grows with the
image).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mfsr_fast.models.conditioning import bicubic
from mfsr_fast.pipeline import compose

WAVELET_REACH = 64  # rows the wavelet colour fix's blur reaches (5 levels of a 5-tap kernel: 2 * (1 + ... + 16) = 62)


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
                 alpha: np.ndarray | None):
        self.out, self.lr, self.s = out, lr, scale
        self.method, self.grey, self.alpha = color_fix, grey, alpha
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
                self._fixed_rows(0, compose.color_fix(full, bicubic(self.lr.float(), (self.mh, self.mw)), "adain"))
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
        band = bicubic(self.lr[:, :, l0:l1].float(), (s * (l1 - l0), self.mw))
        return band[:, :, a - s * l0:b - s * l0]

    def _colour(self, upto: int) -> None:
        e0 = self.emitted
        if self.method == "wavelet":
            a = max(self.b0, e0 - self.reach)
            b = min(self.mh, upto + self.reach, self.b0 + self.buf.shape[2])
            seg = self.buf[:, :, a - self.b0:b - self.b0]
            fixed = compose.color_fix(seg, self._ref_rows(a, b), "wavelet")[:, :, e0 - a:upto - a]
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
