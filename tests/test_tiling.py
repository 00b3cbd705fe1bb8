"""mfsr_fast.pipeline.tiling and .rows: output streamed row band by row band equals the whole-image computation
(plain, wavelet colour fix, resize, grey and alpha), the noise is a function of the seed and the position only,
R(LR) band by band equals R(LR) of the whole image, and what is held at any time is bounded by the tile and the
colour fix's reach, not by the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_restorer_folder

pytest.importorskip("diffusers")

from mfsr_fast.evaluation.metrics import _resize_matrix  # noqa: E402
from mfsr_fast.models.conditioning import bicubic  # noqa: E402
from mfsr_fast.models.restorer import Restorer  # noqa: E402
from mfsr_fast.pipeline import compose, rows, tiling  # noqa: E402
from mfsr_fast.pipeline import pipeline as pl  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from conftest import randomize_

    from mfsr_fast.models.transformer import MFSRTransformer

    torch.manual_seed(0)
    m = MFSRTransformer.from_preset("tiny", num_layers=1, num_heads=2, head_dim=16, dual_attention_layers=(0,))
    return pl.MFSRPipeline(randomize_(m, std=0.05).eval())


def _img(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 1, (1, c, max(2, h // 6), max(2, w // 6))).astype(np.float32))
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0].permute(1, 2, 0).numpy()


def test_noise_is_a_function_of_seed_and_position_only():
    whole = tiling.noise_window(7, 0, 4, 10, 20, 150, 90)
    part = tiling.noise_window(7, 0, 4, 10 + 61, 20 + 33, 40, 50)
    assert torch.equal(whole[:, 61:101, 33:83], part)
    assert not torch.equal(tiling.noise_window(8, 0, 4, 0, 0, 8, 8), tiling.noise_window(7, 0, 4, 0, 0, 8, 8))
    assert not torch.equal(tiling.noise_window(7, 1, 4, 0, 0, 8, 8), tiling.noise_window(7, 0, 4, 0, 0, 8, 8))
    assert abs(float(whole.std()) - 1) < 0.05 and abs(float(whole.mean())) < 0.05


@pytest.mark.parametrize("n_in, n_out", [(40, 160), (160, 40), (160, 100), (13, 52), (52, 13)])
def test_resize_taps_equal_matlab_imresize(n_in, n_out):
    idx, w = rows.resize_taps(n_in, n_out)
    dense = torch.zeros(n_out, n_in, dtype=torch.float64)
    dense.scatter_add_(1, idx, w.double())
    ref = _resize_matrix(n_in, n_out, n_out / n_in)
    assert np.abs(dense.numpy() - ref).max() < 1e-6


@pytest.mark.parametrize("fix, scale, channels", [(None, 4, 3), ("wavelet", 4, 3), (None, 2.5, 4), ("wavelet", 3, 1),
                                                  ("adain", 4, 2)])
def test_streamed_output_equals_the_whole_image(model, fix, scale, channels):
    """Small tiles on a tall image: many bands. Reference: the whole float output, then the same colour fix, the
    same resize taps, channels and rounding applied to the whole image at once."""
    arr = _img(88, 40, channels)
    got = model.upscale_array(arr, tile=16, scale=scale, color_fix=fix, out_dtype=np.float32)
    has_alpha = channels in (2, 4)
    color = arr[..., :-1] if has_alpha else arr
    rgb = np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    full = model.upscale_rgb(x, tile=16)
    if fix:
        full = compose.color_fix(full, bicubic(x, full.shape[-2:]), fix)
    oh, ow = round(88 * scale), round(40 * scale)
    if (oh, ow) != tuple(full.shape[-2:]):
        vi, vw = rows.resize_taps(full.shape[-2], oh)
        hi, hw = rows.resize_taps(full.shape[-1], ow)
        full = torch.einsum("oi,bcij,pj->bcop", torch.zeros(oh, full.shape[-2]).scatter_add_(1, vi, vw), full,
                            torch.zeros(ow, full.shape[-1]).scatter_add_(1, hi, hw))
    ref = full[0].clamp(0, 1).permute(1, 2, 0).numpy()
    if color.shape[2] == 1:
        ref = ref.mean(axis=2, keepdims=True)
    if has_alpha:
        a = torch.from_numpy(np.ascontiguousarray(arr[..., -1]))
        vi, vw = rows.resize_taps(88, oh)
        hi, hw = rows.resize_taps(40, ow)
        a = torch.zeros(oh, 88).scatter_add_(1, vi, vw) @ a @ torch.zeros(ow, 40).scatter_add_(1, hi, hw).T
        ref = np.concatenate([ref, a.clamp(0, 1).numpy()[..., None]], axis=2)
    assert got.shape == ref.shape == (oh, ow, channels)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    u8 = model.upscale_array(arr, tile=16, scale=scale, color_fix=fix, out_dtype=np.uint8)
    assert np.abs(u8.astype(np.int16) - np.rint(got * 255).astype(np.int16)).max() <= 1


def test_rows_held_are_bounded_by_the_tile_not_the_image(model, monkeypatch):
    held = []
    orig = rows.RowSink.push

    def spy(self, r0, rows):
        held.append((rows.shape[2], 0 if self.buf is None else self.buf.shape[2]))
        return orig(self, r0, rows)

    monkeypatch.setattr(rows.RowSink, "push", spy)
    model.upscale_array(_img(400, 24), tile=16, color_fix="wavelet", out_dtype=np.uint8)
    assert len(held) > 20
    assert max(n for n, _ in held) <= 4 * 16  # one row of tiles
    assert max(b for _, b in held) <= 4 * 16 + 2 * rows.WAVELET_REACH


def test_restorer_rows_band_by_band_equal_the_whole_image(tmp_path):
    folder = small_restorer_folder(tmp_path / "r")
    r = Restorer.from_folder(folder, max_side=16)
    x = torch.rand(1, 3, 45, 37)
    whole = r(x).to(tiling.RESTORED_DTYPE)  # the rows are held in it: rounded as the whole image's would be
    restored = tiling.RestoredRows(r, x, 4)
    got = torch.cat([restored(y, min(45, y + 12))[:, :, : 4 * (min(45, y + 10) - y)] for y in range(0, 45, 10)], dim=2)
    assert torch.equal(got, whole)
    restored = tiling.RestoredRows(r, x, 4)
    inside = restored(2, 6)  # within the first band: a view of it, not a copy
    assert inside.untyped_storage().data_ptr() == restored.bands[0][1].untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="bands"):
        r.rows(x, 3, 20)
    # Requests in the coordinates of the image padded to (46, 38): R's rows padded at x4 as F.pad pads R(x).
    padded = torch.nn.functional.pad(whole, (0, 4, 0, 4), mode="reflect")
    restored = tiling.RestoredRows(r, x, 4, padded=(46, 38))
    got = torch.cat([restored(y, min(46, y + 12))[:, :, : 4 * (min(46, y + 10) - y)] for y in range(0, 46, 10)], dim=2)
    assert torch.equal(got, padded)


def test_restored_rows_hold_one_band_and_the_rows_above_it_still_asked_for(tmp_path, monkeypatch):
    folder = small_restorer_folder(tmp_path / "r")
    r = Restorer.from_folder(folder, max_side=16)
    x = torch.rand(1, 3, 70, 40)
    whole = r(x).to(tiling.RESTORED_DTYPE)
    restored = tiling.RestoredRows(r, x, 4)
    held, orig = [], r.rows

    def spy(lr, y0, y1, dtype):  # what is held while the next band is computed
        held.append(sum(band.shape[2] for _, band in restored.bands))
        return orig(lr, y0, y1, dtype)

    monkeypatch.setattr(r, "rows", spy)
    got = []
    for y in range(0, 62, 6):  # tile rows of 8 LR rows every 6: most straddle two bands of 16
        got.append(restored(y, y + 8)[:, :, : 4 * 6])
        assert sum(band.shape[2] for _, band in restored.bands) <= 4 * (16 + 8)
    got.append(restored(66, 70))
    assert torch.equal(torch.cat(got, dim=2), whole)
    assert len(held) == 5 and max(held) <= 4 * 8  # never a whole band above the one being computed


def test_out_of_memory_halves_tiles_per_call_then_the_tile():
    err = torch.OutOfMemoryError("CUDA out of memory")
    cuda = torch.device("cuda")
    assert pl._smaller(cuda, 64, 4, err) == (64, 2)
    assert pl._smaller(cuda, 64, 1, err) == (32, 1)
    for dev, tile, group in ((cuda, 32, 1), (torch.device("cpu"), 64, 4)):
        with pytest.raises(torch.OutOfMemoryError):
            pl._smaller(dev, tile, group, err)


def test_shifted_call_moves_the_patch_grid_and_nothing_else():
    z, c = torch.randn(2, 3, 8, 10), torch.randn(2, 5, 8, 10)
    seen = []

    def f(zz, cc):
        seen.append(zz.shape[-2:])
        return zz * 2 + cc[:, :3]

    assert torch.equal(pl.shifted_call(f, z, c, 0, 2), f(z, c))
    moved = pl.shifted_call(f, z, c, 1, 2)
    assert seen[-1] == (10, 12)  # whole patches: one more patch row and column, the grid moved by one cell
    assert torch.equal(moved, f(z, c))  # a position-wise f: the move is invisible
    with pytest.raises(ValueError, match="shift"):
        pl.shifted_call(f, z, c, 2, 2)


def test_one_step_ignores_the_shift_and_more_steps_use_it(model, monkeypatch):
    x = torch.rand(1, 3, 16, 16)
    calls = []
    orig = pl.shifted_call

    def spy(f, z, c, shift, patch):
        calls.append(shift)
        return orig(f, z, c, shift, patch)

    monkeypatch.setattr(pl, "shifted_call", spy)
    model.upscale_rgb(x, steps=1)
    assert calls == [0]
    calls.clear()
    model.upscale_rgb(x, steps=4)
    assert calls == [0, 1, 0, 1]
