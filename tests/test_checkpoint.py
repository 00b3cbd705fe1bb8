"""training/checkpoint.py: no pickle, atomic, bit-exact resume of model, EMA, optimizer and RNG."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import micro_inputs, micro_model

from training import checkpoint as C


def _step(model, opt, inp):
    """One training step that also consumes every RNG a trainer uses (torch, numpy, python)."""
    noise = torch.randn_like(inp["z"]) * float(np.random.rand()) * random.random()
    u = model(**{**inp, "z": inp["z"] + noise})
    loss = u.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _ema_update(ema, model, decay=0.9):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def test_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = micro_model()
    ema = micro_model()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    inp = micro_inputs(model)
    for _ in range(3):
        _step(model, opt, inp)
        _ema_update(ema, model)
    path = C.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, ema=ema, config={"lr": 1e-3},
                             extra={"skipped": 0})
    for _ in range(3):
        _step(model, opt, inp)
        _ema_update(ema, model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_ema = {k: v.clone() for k, v in ema.state_dict().items()}

    # A fresh process would build new objects: different init, different RNG state.
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2 = micro_model()
    for p in model2.parameters():
        torch.nn.init.normal_(p)
    ema2 = micro_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0, betas=(0.5, 0.5), weight_decay=0.0)
    assert C.latest_checkpoint(str(tmp_path)) == path
    meta = C.load_checkpoint(path, model=model2, optimizer=opt2, ema=ema2)
    assert meta["step"] == 3 and meta["config"] == {"lr": 1e-3} and meta["extra"] == {"skipped": 0}
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.99)
    for _ in range(3):
        _step(model2, opt2, inp)
        _ema_update(ema2, model2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    for k, v in ema2.state_dict().items():
        assert torch.equal(v, ref_ema[k]), k


def test_checkpoint_files_hold_no_pickle(tmp_path):
    model = micro_model()
    opt = torch.optim.Adam(model.parameters())
    inp = micro_inputs(model)
    _step(model, opt, inp)
    path = C.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt)
    files = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
    assert files == {"model/config.json", "model/diffusion_pytorch_model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json", "manifest.json"}
    with open(os.path.join(path, "trainer_state.json")) as f:
        json.load(f)
    with open(os.path.join(path, "manifest.json")) as f:  # every other file, with its size and SHA-256
        assert set(json.load(f)["files"]) == files - {"manifest.json"}


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = micro_model()
    opt = torch.optim.Adam(model.parameters())
    first = C.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(C, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(str(tmp_path), 2, model=model, optimizer=opt)
    assert C.latest_checkpoint(str(tmp_path)) == first
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step_00000001"]


def test_keep_prunes_old_checkpoints_and_bad_paths_are_clear(tmp_path):
    model = micro_model()
    for step in range(1, 6):
        C.save_checkpoint(str(tmp_path), step, model=model, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_00000004", "step_00000005"]
    assert C.latest_checkpoint(str(tmp_path / "none")) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        C.load_checkpoint(str(tmp_path), model=model)
    with pytest.raises(ValueError, match="no optimizer state"):
        C.load_checkpoint(C.latest_checkpoint(str(tmp_path)), model=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
