"""Would int8 Real-ESRGAN be worth it? Its quality, simulated, and its speed, one layer measured (CPU).

Quality: the default in float32 with Real-ESRGAN's convolutions between the first and the last (those bfloat16 would
take) quantized as post-training int8 quantization would: weights per output channel, symmetric; each convolution's
input per tensor, asymmetric uint8, its range the minimum and maximum seen on calibration photos. The arithmetic is
simulated in float32 (quantize, then dequantize); reported is the PSNR over 8-bit pixels of the output, and of
Real-ESRGAN's own, against float32, at 1 step, and Real-ESRGAN's with only the weights quantized (its inputs float):
what int8 weights alone cost, however well the inputs were calibrated. The precision guard of ``test_precision`` asks
for ``GOAL_DB``.
Speed: one dense-block convolution (192 -> 64 channels, 3 x 3) on a padded 256 px tile, int8 through PyTorch's
quantized convolution (oneDNN) against bfloat16 with channels_last, median of 5.
With ``--benchmark``: calibration on two demo photos, evaluation on the other three and, where ``../shared/data``
has them, the first 10 DRealSR LR images; without it, one small photo checks the harness."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timing import median_seconds

from mfsr_fast.apps.demo import PHOTOS, photo
from mfsr_fast.pipeline.loading import DEFAULT_MODEL
from mfsr_fast.pipeline.pipeline import MFSRPipeline

GOAL_DB = 45.0
DREALSR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval", "drealsr_x4", "LR")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _lr(name: str, side: int) -> np.ndarray:
    hr = Image.fromarray(photo(name, side))
    return np.asarray(hr.resize((hr.width // 4, hr.height // 4), Image.BOX))


def _fake_quant(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """x rounded to the 256 levels of [lo, hi] (lo <= 0, so that 0 is a level) and back."""
    scale = max(hi - lo, 1e-8) / 255
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


class Int8Simulation:
    """Hooks on a restorer's inner convolutions: ``calibrate`` records each input's range, ``on`` quantizes the
    weights and (``inputs``) the inputs, ``off`` restores the float weights."""

    def __init__(self, restorer):
        self.convs = restorer.net.conv_layers()[1:-1]
        self.ranges = {c: (0.0, 0.0) for c in self.convs}
        self.weights = {c: c.weight.detach().clone() for c in self.convs}
        self.hooks = []

    def calibrate(self):
        def seen(conv, args):
            lo, hi = self.ranges[conv]
            self.ranges[conv] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        self.hooks = [c.register_forward_pre_hook(seen) for c in self.convs]

    def on(self, inputs: bool = True):
        self.off()
        for c in self.convs:
            w = self.weights[c]
            step = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127
            c.weight.data.copy_(torch.round(w / step).clamp(-127, 127) * step)
            if not inputs:
                continue
            lo, hi = self.ranges[c]
            hook = c.register_forward_pre_hook(lambda m, args, lo=lo, hi=hi: (_fake_quant(args[0], lo, hi),))
            self.hooks.append(hook)

    def off(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for c in self.convs:
            c.weight.data.copy_(self.weights[c])


@torch.inference_mode()
def _conv_times(side: int) -> tuple[float, float]:
    """(bfloat16, int8) seconds of one 192 -> 64 3x3 convolution on a side x side input."""
    from torch.ao.nn.quantized import Conv2d as QConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(192, 64, 3, 1, 1)
    x = torch.rand(1, 192, side, side).contiguous(memory_format=torch.channels_last)
    bf16 = conv.to(torch.bfloat16, memory_format=torch.channels_last)
    xb = x.to(torch.bfloat16)
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "onednn"
    q = QConv2d(192, 64, 3, 1, 1)
    w = conv.weight.float()
    step = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127
    q.set_weight_bias(torch.quantize_per_channel(w, step.double(), torch.zeros(64, dtype=torch.long), 0, torch.qint8),
                      conv.bias.float())
    q.scale, q.zero_point = 0.05, 0
    xq = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    return median_seconds(lambda: bf16(xb), 5), median_seconds(lambda: q(xq), 5)


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_int8_restorer_quality_and_speed(full, env_info):
    pipe = MFSRPipeline.from_pretrained("default", dtype="float32")
    sim = Int8Simulation(pipe.restorer)
    side = 384 if full else 64
    sim.calibrate()
    for name in PHOTOS[:2] if full else PHOTOS[:1]:
        pipe.restorer(torch.from_numpy(_lr(name, side).copy()).permute(2, 0, 1)[None].float() / 255)
    images = {name: _lr(name, side) for name in (PHOTOS[2:] if full else PHOTOS[1:2])}
    for path in sorted(glob.glob(os.path.join(DREALSR, "*.png")))[: 10 if full else 0]:
        images[os.path.basename(path)] = np.asarray(Image.open(path).convert("RGB"))
    rows = []
    for name, lr in images.items():
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
        sim.off()
        ref, ref_r = pipe(lr, steps=1), pipe.restorer(x)
        sim.on()
        out, out_r = pipe(lr, steps=1), pipe.restorer(x)
        sim.on(inputs=False)
        out_w = pipe.restorer(x)
        sim.off()
        ref_r, out_r, out_w = [(t.clamp(0, 1) * 255).round().byte().numpy() for t in (ref_r, out_r, out_w)]
        rows.append((name, _psnr(out, ref), _psnr(out_r, ref_r), _psnr(out_w, ref_r)))
    tile = 276 if full else 32
    bf16, int8 = _conv_times(tile)
    print(f"\nint8 Real-ESRGAN, simulated, against float32 ({env_info}): PSNR over 8-bit pixels, dB, 1 step")
    print("| image | the default | Real-ESRGAN alone | Real-ESRGAN, int8 weights only |")
    print("| --- | --- | --- | --- |")
    for name, *dbs in rows:
        print(f"| {name} | " + " | ".join(f"{db:.1f}" for db in dbs) + " |")
    print(f"worst {min(r[1] for r in rows):.1f} dB, {min(r[3] for r in rows):.1f} dB with int8 weights only "
          f"(the precision guard asks for {GOAL_DB:g})")
    print(f"one 192 -> 64 convolution at {tile} px: bfloat16 {1e3 * bf16:.1f} ms, int8 {1e3 * int8:.1f} ms")
    assert all(np.isfinite(db) and db > 20 for r in rows for db in r[1:])  # the simulation quantizes, it does not break
