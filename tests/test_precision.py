"""Precision chosen for the machine and reported, or forced, and really reaching both networks; the restorer's
lower-precision body with a float32 residual stream and tail; its upsampling tail run in bands, exactly as in one
piece."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_rrdbnet

pytest.importorskip("diffusers")

from mfsr_fast import MFSRPipeline  # noqa: E402
from mfsr_fast.apps import cli  # noqa: E402
from mfsr_fast.models import restorer as rs  # noqa: E402
from mfsr_fast.models.transformer import MFSRTransformer  # noqa: E402
from mfsr_fast.pipeline import loading  # noqa: E402
from mfsr_fast.pipeline import upscale as up  # noqa: E402


@pytest.fixture
def model_r(tmp_path, restorer_dir):
    """A restorer-conditioned micro model saved as a folder, its small restorer found by name."""
    torch.manual_seed(0)
    m = MFSRTransformer.from_preset("tiny-r", num_layers=1, dual_attention_layers=(0,), num_heads=2, head_dim=16)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # not the fresh model that returns R exactly
    m.save_pretrained(str(tmp_path / "model"))
    return str(tmp_path / "model")


@pytest.mark.parametrize("feature, transformer, restorer", [
    ("AMX", torch.bfloat16, torch.bfloat16),
    ("AVX512_BF16", torch.bfloat16, torch.bfloat16),
    (None, torch.float32, torch.float32)])
def test_the_precision_is_chosen_for_the_cpu(monkeypatch, feature, transformer, restorer):
    monkeypatch.setattr(loading, "native_bf16", lambda: feature)
    p = loading.auto_precision(torch.device("cpu"))
    assert (p.transformer, p.restorer) == (transformer, restorer)
    assert (feature or "no native bfloat16") in str(p)
    forced = loading.auto_precision(torch.device("cpu"), "float32")
    assert (forced.transformer, forced.restorer) == (torch.float32, torch.float32) and "as asked" in str(forced)
    assert loading.auto_precision(torch.device("cuda"), None).transformer == torch.bfloat16


def test_this_machines_answer_comes_from_torch(monkeypatch):
    """The real answer (conftest pins it for the other tests) names the feature torch reports, AMX first."""
    monkeypatch.undo()
    cpu = torch.cpu
    want = "AMX" if cpu._is_amx_tile_supported() else "AVX512_BF16" if cpu._is_avx512_bf16_supported() else None
    assert loading.native_bf16() == (want if torch.backends.mkldnn.is_available() else None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_forced_dtype_reaches_both_networks_and_is_reported(model_r, tmp_path, capsys, dtype):
    pipe = MFSRPipeline.from_pretrained(model_r, dtype=dtype)
    dt = getattr(torch, dtype)
    assert pipe.dtype == dt and pipe.restorer.dtype == dt and pipe.precision.restorer == dt
    net = pipe.restorer.net
    assert net.conv_first.weight.dtype == net.conv_last.weight.dtype == torch.float32  # the ends stay float32
    assert all(p.dtype == dt for p in net.body.parameters())
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert cli.main([str(tmp_path / "a.png"), "-o", str(tmp_path / dtype), "--model", model_r, "--dtype", dtype]) == 0
    assert f"{dtype} (as asked)" in capsys.readouterr().out


def test_the_automatic_choice_is_reported_and_moves_with_to(model_r, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(loading, "native_bf16", lambda: None)
    pipe = MFSRPipeline.from_pretrained(model_r)
    assert pipe.dtype == pipe.restorer.dtype == torch.float32 and "no native bfloat16" in str(pipe.precision)
    pipe.to(dtype="bfloat16")
    assert pipe.dtype == pipe.restorer.dtype == torch.bfloat16 and "as asked" in str(pipe.precision)
    monkeypatch.setattr(loading, "native_bf16", lambda: "AMX")
    up.clear_cache()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert cli.main([str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--model", model_r]) == 0
    assert "chosen for this CPU: AMX" in capsys.readouterr().out


def _net(seed=0) -> rs.RRDBNet:
    return random_rrdbnet(seed, bias_std=0.02, num_feat=8, num_block=2, num_grow_ch=4).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_upsampling_tail_in_bands_is_the_tail_in_one_piece(dtype, monkeypatch):
    """Bit for bit at the real network's width (64 channels, channels_last): every band sees the rows of context
    (TAIL_HALO) the whole tail would, and no band is short enough for oneDNN to pick another kernel."""
    torch.manual_seed(0)
    net = rs.RRDBNet(num_feat=64, num_block=1, num_grow_ch=32).eval().to(memory_format=torch.channels_last)
    net.set_dtype(dtype)
    for h, w in ((40, 23), (57, 31)):
        x = torch.rand(1, 3, h, w).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            whole = net(x)
            for rows in (16, 20, 28):
                assert torch.equal(net(x, tail_rows=rows), whole), (h, rows)
    r = rs.Restorer(net)
    x = torch.rand(1, 3, 40, 23)
    whole = r(x)
    monkeypatch.setattr(rs, "TAIL_BYTES", 1)  # the shortest bands the restorer runs
    assert torch.equal(r(x), whole)


def test_a_bfloat16_body_keeps_the_ends_and_the_residual_stream_in_float32():
    net32, net16 = _net(), _net().set_dtype(torch.bfloat16)
    assert net16.conv_first.weight.dtype == net16.conv_last.weight.dtype == torch.float32
    assert net16.body[0].rdb1.conv1.weight.dtype == net16.conv_hr.weight.dtype == torch.bfloat16
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        a, b = net32(x), net16(x)
        plain = _net().to(torch.bfloat16)(x)  # a network moved with .to() as a whole still runs
    assert b.dtype == torch.float32 and plain.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert 0 < err < 1e-2 * a.abs().max().item()
