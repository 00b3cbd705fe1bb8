"""A training run's settings: a dataclass of fields common to ``python -m training.teacher`` and ``python -m
training.distill`` (each command adds its own), with named presets, every field overridable from the command line
(``--batch-size 8``); printed at start and saved as ``<output-dir>/config.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "train")


@dataclass
class TrainConfig:
    """Fields common to both commands (each command adds its own)."""

    model_preset: str = "tiny"  # MFSRTransformer preset
    model_overrides: dict = field(default_factory=dict)  # MFSRConfig fields over the preset (JSON on the CLI)
    data: str = DEFAULT_DATA  # any folder of images (recursive)
    vae: str = ""  # diffusers AutoencoderKL folder, for models in SD3 VAE latent space (codec "sd3-vae")
    output_dir: str = "runs/run"
    max_steps: int = 2000
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much training wall time; 0: no time limit
    batch_size: int = 16  # global batch (split over the processes)
    crop: int = 128  # HR crop in pixels; LR is crop / 4
    degradation: str = "realesrgan"  # training/degrade.py preset
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    override: str = ""  # with --resume: settings this leg may change from the run's, named (lr,batch_size)
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    t_mean: float = -0.4  # logit-normal time sampling
    t_std: float = 1.0
    t_one_fraction: float = 0.0  # share of samples at t = 1 exactly (pure noise: the one-step start)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP
    num_workers: int = 1  # data-loading processes (0: in the training process)
    degrade_on: str = "workers"  # where the degradation runs: workers (data-loading processes) | device (training)
    threads: int = 0  # torch CPU threads (0: torch's default)
    pool: str = ""  # a precomputed sample pool (python -m training.pool): (HR, LR, R(LR)) instead of degrading here
    # Watching the run (training/monitor.py): every sample_every steps and at the end, a PNG grid of sample_count
    # held-in crops in <output-dir>/samples and PSNR-Y / SSIM-Y (NIQE with niqe_params) rows in log.jsonl, on the
    # first val_count pairs of val_data (HR/ + LR/) or on the crops; tensorboard: the same scalars and images.
    sample_every: int = 0  # 0: off
    sample_count: int = 4
    val_data: str = ""
    val_count: int = 4
    niqe_params: str = ""
    tensorboard: bool = False


def _parse_value(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, (dict, list)):
        return json.loads(text)
    return type(default)(text)


def parse_config(cls, presets: dict[str, dict], argv: list[str] | None, description: str):
    """Build ``cls`` from ``--preset NAME`` plus ``--field value`` overrides (dashes or underscores)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default=next(iter(presets)), choices=sorted(presets),
                    help="named starting configuration (default: %(default)s)")
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(flag, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                            help=f"default {json.dumps(default)}")
    args = ap.parse_args(argv)
    values = dict(presets[args.preset])
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        try:
            values[f.name] = raw if isinstance(raw, bool) else _parse_value(raw, getattr(defaults, f.name))
        except (ValueError, json.JSONDecodeError) as e:
            ap.error(f"--{f.name.replace('_', '-')}: cannot read {raw!r}: {e}")
    try:
        return cls(**values)
    except TypeError as e:
        ap.error(str(e))
