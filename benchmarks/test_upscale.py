"""Upscaling speed: 128 -> 512 px with the embedded default (1 and 4 steps) against a Real-ESRGAN x4plus-architecture
network (RRDBNet: 23 blocks, 64 features, growth 32, random weights: timing only) and bicubic, in the same run.

The MFSR calls use upscale()'s default tiling (the model's native tile size). On a GPU with ``--benchmark`` the same
comparison runs on the GPU. (The ``dit4sr`` preset's 1 step vs the teacher's
40 steps x CFG at 512 px needs the SD3.5 VAE, issue 7, and is not measured here.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import median_seconds

from mfsr_fast.inference import DEFAULT_MODEL, load_model, upscale_rgb


class _DenseBlock(nn.Module):
    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5)])

    def forward(self, x):
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class _RRDB(nn.Module):
    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*[_DenseBlock(nf, gc) for _ in range(3)])

    def forward(self, x):
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    """The ESRGAN / Real-ESRGAN x4plus generator architecture (for timing)."""

    def __init__(self, nb: int = 23, nf: int = 64, gc: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.up1, self.up2 = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr, self.conv_last = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        f = self.conv_first(x)
        f = f + self.conv_body(self.body(f))
        f = F.leaky_relu(self.up1(F.interpolate(f, scale_factor=2, mode="nearest")), 0.2)
        f = F.leaky_relu(self.up2(F.interpolate(f, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(f), 0.2))


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_upscale_128_to_512(benchmark, full, env_info):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    side = 128 if full else 32
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, side, side, generator=g).to(device)
    model = load_model("default", device)
    rrdb = RRDBNet().to(device).eval()
    reps = 3 if full else 1
    with torch.inference_mode():
        times = {
            "mfsr_1step": median_seconds(lambda: upscale_rgb(model, x, steps=1), reps),
            "mfsr_4step": median_seconds(lambda: upscale_rgb(model, x, steps=4), reps),
            "rrdbnet_x4plus": median_seconds(lambda: rrdb(x), reps),
            "bicubic": median_seconds(lambda: F.interpolate(x, scale_factor=4, mode="bicubic"), reps),
        }
    info = dict(env_info, lr_side=side, out_side=4 * side, params_mfsr=sum(p.numel() for p in model.parameters()),
                params_rrdbnet=sum(p.numel() for p in rrdb.parameters()))
    info.update({f"ms_{k}": v * 1e3 for k, v in times.items()})
    info["mfsr_1step_over_rrdbnet"] = times["mfsr_1step"] / times["rrdbnet_x4plus"]
    benchmark.extra_info.update(info)
    with torch.inference_mode():
        benchmark.pedantic(lambda: upscale_rgb(model, x, steps=1), rounds=reps, warmup_rounds=0)
