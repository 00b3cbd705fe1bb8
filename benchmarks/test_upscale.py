"""Upscaling speed: 128 -> 512 px with the embedded default (1 and 4 steps) against Real-ESRGAN x4plus
(``mfsr_fast.models.restorer``; RRDBNet: 23 blocks, 64 features, growth 32) and bicubic, in the same run.

The MFSR calls use upscale()'s default tiling (the model's native tile size). On a GPU with ``--benchmark`` the same
comparison runs on the GPU.

``test_dit4sr_one_step_vs_teacher``: on a GPU with ``--benchmark``, the ``dit4sr`` preset (2.59 B parameters, bf16)
with an SD3.5-sized VAE, 128 -> 512 px: the student's 1 step against the teacher's 40 Euler steps with CFG (80
network passes), both through ``MFSRPipeline.upscale_rgb`` (VAE encode and decode included). Random weights: timing
only. Without ``--benchmark`` a tiny model and VAE check the harness on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from timing import median_seconds

from mfsr_fast.models.codec import VAECodec
from mfsr_fast.models.restorer import Restorer, RRDBNet, load_restorer
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.pipeline.loading import DEFAULT_MODEL
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import TeacherSampling


def _realesrgan(device) -> tuple[Restorer, str]:
    """Real-ESRGAN x4plus as users run it (``models.restorer``) and which weights: the released ones where the
    set-up converted them, else the same RRDBNet with random weights (the same time)."""
    try:
        return load_restorer(device=device), "released"
    except ValueError:
        return Restorer(RRDBNet().to(device)), "random (not converted here)"


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")), reason="no embedded default")
def test_upscale_128_to_512(benchmark, full, env_info):
    """The default's ``upscale`` path (its restorer included) in the precision chosen for the machine and in
    float32, against Real-ESRGAN x4plus alone in float32 (channels_last), timed in the same run. Goals on a CPU
    with native bfloat16: 1 step within 0.35x Real-ESRGAN-fp32's time, 4 steps within 0.7x."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    side = 128 if full else 32
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, side, side, generator=g).to(device)
    pipe = MFSRPipeline.from_pretrained("default", device=device)
    fp32 = MFSRPipeline.from_pretrained("default", device=device, dtype="float32")
    model = pipe.transformer
    realesrgan, weights = _realesrgan(device)
    reps = 3 if full else 1
    calls = {"realesrgan_x4plus_fp32": lambda: realesrgan(x),
             "mfsr_1step": lambda: pipe.upscale_rgb(x, steps=1),
             "mfsr_4step": lambda: pipe.upscale_rgb(x, steps=4),
             "mfsr_1step_fp32": lambda: fp32.upscale_rgb(x, steps=1),
             "mfsr_4step_fp32": lambda: fp32.upscale_rgb(x, steps=4),
             "bicubic": lambda: F.interpolate(x, scale_factor=4, mode="bicubic")}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up (allocator, oneDNN primitives) for all
            fn()
        times = {k: [] for k in calls}
        for _ in range(reps):  # interleaved, so that a slow moment of the machine touches every method alike
            for k, fn in calls.items():
                times[k].append(median_seconds(fn, 1))
        times = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    info = dict(env_info, lr_side=side, out_side=4 * side, params_mfsr=sum(p.numel() for p in model.parameters()),
                params_realesrgan=sum(p.numel() for p in realesrgan.net.parameters()),
                realesrgan_weights=weights, default_uses_restorer=model.needs_restorer, precision=str(pipe.precision))
    info.update({f"ms_{k}": v * 1e3 for k, v in times.items()})
    for k in ("mfsr_1step", "mfsr_4step", "mfsr_1step_fp32", "mfsr_4step_fp32"):
        info[f"{k}_over_realesrgan_fp32"] = times[k] / times["realesrgan_x4plus_fp32"]
    info["shape"] = f"{side}->{4 * side}"
    benchmark.extra_info.update(info)
    print(f"\n128 -> 512 ({env_info}, {pipe.precision}): " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    with torch.inference_mode():
        benchmark.pedantic(lambda: pipe.upscale_rgb(x, steps=1), rounds=reps, warmup_rounds=0)


# SD3 / SD3.5 VAE sizes (diffusers AutoencoderKL config of stable-diffusion-3.5-medium/vae).
SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
TINY_VAE = dict(SD35_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)


def test_dit4sr_one_step_vs_teacher(benchmark, full, env_info):
    from diffusers import AutoencoderKL

    gpu = torch.cuda.is_available() and full
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator().manual_seed(0)
    with torch.device(device):  # initialised where it runs: 2.59 B parameters are slow to initialise on a CPU
        if gpu:
            model = MFSRTransformer.from_preset("dit4sr")
            vae = AutoencoderKL(**SD35_VAE)
        else:
            model = MFSRTransformer.from_preset("dit4sr", num_layers=1, num_heads=2, head_dim=16, context_dim=32,
                                                pooled_dim=16, dual_attention_layers=(0,))
            vae = AutoencoderKL(**TINY_VAE)
    cfg = model.cfg
    tokens = 333 if gpu else 5  # SD3's prompt length (77 CLIP + 256 T5)
    model.set_prompts(torch.randn(3, tokens, cfg.context_dim, generator=g), torch.randn(3, cfg.pooled_dim, generator=g))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = MFSRPipeline(model, VAECodec(vae.to(dtype=dtype)))
    teacher_pipe = pipe.with_sampler(TeacherSampling(guidance=8.0))
    side = 128 if gpu else 16
    x = torch.rand(1, 3, side, side, generator=g).to(device)
    steps = 40 if gpu else 2
    reps = 3 if gpu else 1
    with torch.inference_mode():
        pipe.upscale_rgb(x, steps=1, tile=side)  # warm-up: kernel compilation, allocator
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        one = median_seconds(lambda: pipe.upscale_rgb(x, steps=1, tile=side), reps)
        teacher = median_seconds(lambda: teacher_pipe.upscale_rgb(x, steps=steps, tile=side), 1)
    info = dict(env_info, preset="dit4sr" if gpu else "dit4sr (1-block smoke size)", dtype=str(dtype),
                lr_side=side, out_side=4 * side, params=sum(p.numel() for p in model.parameters()),
                shape=f"{side}->{4 * side}", ms_student_1step=one * 1e3, ms_teacher=teacher * 1e3,
                teacher_steps=steps, teacher_nfe=2 * steps, speedup_vs_teacher_cfg=teacher / one)
    if gpu:
        info["peak_mb_triton"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info.update(info)
    with torch.inference_mode():
        benchmark.pedantic(lambda: pipe.upscale_rgb(x, steps=1, tile=side), rounds=reps, warmup_rounds=0)
