"""training/data.py: any image folder, conversions, corrupt files skipped and counted, crops and flips."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import ImageFolder, load_rgb


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a" / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "a" / "b" / "photo.JPG", quality=90)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.bmp")
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "alpha.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(rgb[:10, :12]).save(tmp_path / "small.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    good = tmp_path / "a" / "rgb.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    return tmp_path


def test_folder_loads_every_format_and_skips_corrupt_files(folder):
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ds = ImageFolder(str(folder), crop=16)
        items = [ds[i] for i in range(len(ds))]
    names = sorted(os.path.basename(f) for f in ds.files)
    assert "notes.txt" not in names and "broken.png" not in names
    assert {"rgb.png", "photo.JPG", "grey.bmp", "alpha.png", "palette.gif", "small.webp"} <= set(names)
    assert {os.path.basename(p) for p in ds.skipped} == {"broken.png", "truncated.png"}
    for x in items:
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_conversions(folder):
    grey = load_rgb(str(folder / "grey.bmp"))
    assert grey.shape == (40, 50, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    alpha = load_rgb(str(folder / "a" / "alpha.png"))
    rgb = load_rgb(str(folder / "a" / "rgb.png"))
    # Composited on white at alpha 128/255.
    expected = rgb * (128 / 255) + (1 - 128 / 255)
    assert np.abs(alpha - expected).max() < 2 / 255


def test_small_images_are_upscaled_to_the_crop(folder):
    ds = ImageFolder(str(folder / "a"), crop=32)
    assert all(ds[i].shape == (3, 32, 32) for i in range(len(ds)))
    only_small = folder / "s"
    only_small.mkdir()
    os.replace(folder / "small.webp", only_small / "small.webp")
    assert ImageFolder(str(only_small), crop=48)[0].shape == (3, 48, 48)


def test_crops_are_seeded_and_vary(folder):
    ds = ImageFolder(str(folder / "a"), crop=16, seed=1)
    ds2 = ImageFolder(str(folder / "a"), crop=16, seed=1)
    assert torch.equal(ds[0], ds2[0])
    crops = {tuple(ds[0].flatten()[:8].tolist())}
    for epoch in range(1, 8):
        ds.set_epoch(epoch)
        crops.add(tuple(ds[0].flatten()[:8].tolist()))
    assert len(crops) > 3


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no readable images"):
        ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolder(str(tmp_path / "nope"))


def test_shared_training_images_load(shared_data):
    ds = ImageFolder(os.path.join(shared_data, "train", "t91"), crop=64)
    assert len(ds) >= 50 and not ds.skipped
    assert ds[0].shape == (3, 64, 64)
