"""The training loop shared by ``python -m training.teacher`` and ``python -m training.distill``.

What it gives both commands:
- a dataclass config with named presets, every field overridable from the command line (``--batch-size 8``), printed
  at start and saved as ``<output-dir>/config.json``;
- deterministic data: sample j of the global batch at step s is drawn from its own seed (seed, s, j): the HR crop,
  its degradation, the noise, t, r and the prompt choice. A resumed run and a run split over N processes see exactly
  the batches of one uninterrupted single process;
- AdamW with linear warm-up, gradient clipping, EMA weights, bf16 autocast on CUDA;
- checkpoints (training/checkpoint.py) every ``ckpt_every`` steps, at the end, and on SIGTERM/SIGINT; ``--resume``
  continues from the newest one;
- a non-finite loss or gradient skips the step and is counted; ``max_nonfinite`` in a row stop the run with a message
  and a checkpoint of the weights from before the blow-up (skipped steps change nothing);
- torchrun: DDP over gloo (CPU) or NCCL (GPU); the global batch is split over the ranks. ``--fsdp`` shards the
  weights, gradients and optimizer state with FSDP2 instead (one unit per transformer block); checkpoints are gathered
  to rank 0 in the same format, so a sharded run resumes from a single-process checkpoint and the other way round;
- tqdm progress (loss, steps/s, images/s) and a JSONL log ``<output-dir>/log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mfsr_fast.inference import codec_of, resolve_device
from mfsr_fast.integrity import checkpoint_steps
from mfsr_fast.model import MFSRTransformer
from training import checkpoint as ckpt
from training.data import ImageFolder
from training.degrade import PRESETS as DEGRADATIONS
from training.degrade import degrade
from training.pool import Pool, restore_crops

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


# Distributed set-up (torchrun).


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def training_device(want: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) -> this process's device (``inference.resolve_device``, the one resolver);
    under torchrun, the local rank's GPU."""
    try:
        device = resolve_device(want)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def setup(cfg: TrainConfig) -> Dist:
    if cfg.degrade_on not in ("workers", "device"):
        raise SystemExit(f"--degrade-on must be workers or device, got {cfg.degrade_on!r}")
    if cfg.max_minutes < 0:
        raise SystemExit(f"--max-minutes must be >= 0 (0: no time limit), got {cfg.max_minutes}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = training_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    return Dist(rank, world, device)


# Data: one step's samples, each from its own seed.


def sample_seed(seed: int, step: int, j: int) -> int:
    return (seed * 1_000_003 + step * 65_537 + j) & 0x7FFF_FFFF_FFFF


class StepBatches(torch.utils.data.Dataset):
    """Item s = this rank's part of the global batch of step s: HR (b, 3, crop, crop), LR (b, 3, crop/4, crop/4) and
    the per-sample generator seeds. Deterministic in (seed, step, sample index) only.

    With ``degrade=False`` the item is (raw HR crops, seeds) and the caller degrades them (``degrade_samples``), e.g.
    on the GPU: the degradation, not the image decoding, is what limits the data-loading processes."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, scale: int = 4, degrade: bool = True):
        self.cfg, self.rank, self.world, self.scale = cfg, rank, world, scale
        self.pool = None
        if cfg.pool:
            self.pool = Pool(cfg.pool)
            if self.pool.crop != cfg.crop:
                raise ValueError(f"--pool {cfg.pool} holds {self.pool.crop} px crops, --crop is {cfg.crop}")
        else:
            self.images = ImageFolder(cfg.data, crop=cfg.crop, flip=True, seed=cfg.seed, multiple_of=scale)
        self.degradation = DEGRADATIONS[cfg.degradation]
        self.per_rank = cfg.batch_size // world
        self.degrade = degrade

    def __len__(self) -> int:
        return self.cfg.max_steps

    def _from_pool(self, step: int):
        """(HR, LR, R(LR), seeds) from the pool: an epoch-seeded permutation, a seeded horizontal flip per sample."""
        n = len(self.pool)
        hrs, lrs, rs, seeds = [], [], [], []
        perms: dict[int, torch.Tensor] = {}
        for j in range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank):
            epoch, pos = divmod(step * self.cfg.batch_size + j, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            hr, lr, r = self.pool[int(perms[epoch][pos])]
            seed = sample_seed(self.cfg.seed, step, j)
            if torch.rand((), generator=torch.Generator().manual_seed(seed ^ 0x2545F491)).item() < 0.5:
                hr, lr, r = hr.flip(-1), lr.flip(-1), r.flip(-1)
            hrs.append(hr)
            lrs.append(lr)
            rs.append(r)
            seeds.append(seed)
        return torch.stack(hrs), torch.stack(lrs), torch.stack(rs), torch.tensor(seeds, dtype=torch.long)

    def __getitem__(self, step: int):
        if self.pool is not None:
            return self._from_pool(step)
        n = len(self.images)
        hrs, seeds = [], []
        perms: dict[int, torch.Tensor] = {}
        for j in range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank):
            flat = step * self.cfg.batch_size + j
            epoch, pos = divmod(flat, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            perm = perms[epoch]
            self.images.set_epoch(epoch)
            hrs.append(self.images[int(perm[pos])])
            seeds.append(sample_seed(self.cfg.seed, step, j))
        hr, seeds = torch.stack(hrs), torch.tensor(seeds, dtype=torch.long)
        if not self.degrade:
            return hr, seeds
        return (*degrade_samples(hr, seeds, self.degradation), seeds)


def degrade_samples(hr: torch.Tensor, seeds: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(sharpened HR, LR): each sample degraded on its own with its own seed, on hr's device (so a sample's LR does
    not depend on the batch it is in; CPU and GPU differ only in the last float bits)."""
    gts, lrs = [], []
    for j in range(hr.shape[0]):
        gt, lr = degrade(hr[j:j + 1], cfg, seed=int(seeds[j]))
        gts.append(gt)
        lrs.append(lr)
    return torch.cat(gts), torch.cat(lrs)


def per_sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    # Offset from the degradation's seed so the noise is not correlated with the degradation draws.
    return [torch.Generator().manual_seed(int(s) ^ 0x5DEECE66D) for s in seeds]


def per_sample_randn(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def per_sample_rand(gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=g) for g in gens])


def logit_normal(gens: list[torch.Generator], mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(torch.stack([torch.randn((), generator=g) for g in gens]) * std + mean)


def sample_t(gens: list[torch.Generator], cfg: TrainConfig) -> torch.Tensor:
    """Logit-normal t, with ``t_one_fraction`` of the samples at exactly 1 (where one-step sampling starts, and
    which a logit-normal almost never draws)."""
    t = logit_normal(gens, cfg.t_mean, cfg.t_std)
    return torch.where(per_sample_rand(gens) < cfg.t_one_fraction, torch.ones_like(t), t)


def codec_for(model: MFSRTransformer, vae: str = ""):
    """``inference.codec_of`` (the one codec lookup) for the training commands: the pixel codec, or the SD3 VAE from
    ``--vae`` (a diffusers AutoencoderKL folder) for "sd3-vae" models; mistakes as command-line errors."""
    if model.cfg.codec == "pixel4" and vae:
        raise SystemExit("--vae is for models in SD3 VAE latent space; this model uses the pixel codec")
    if model.cfg.codec != "pixel4" and not vae:
        raise SystemExit(f"this model works in SD3 VAE latents (codec {model.cfg.codec!r}): pass --vae, the VAE "
                         "folder (e.g. stable-diffusion-3.5-medium/vae)")
    try:
        return codec_of(model, vae=vae or None)
    except ValueError as e:
        raise SystemExit(f"--vae: {e}") from None


# EMA.


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)


# The loop.


class Stop(Exception):
    pass


def _ignore_signals(_worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGINT to the main process (schedulers signal the whole process group), which
    checkpoints and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _out_of_time(deadline: float, d: Dist) -> bool:
    """Past the wall-time budget; every rank takes rank 0's decision (their clocks differ)."""
    late = time.monotonic() >= deadline
    if d.world > 1:
        flag = torch.tensor([float(late)], device=d.device)
        dist.broadcast(flag, src=0)
        late = bool(flag.item())
    return late


def _load_resumed(cfg: TrainConfig, path: str, **kw) -> int:
    """``checkpoint.load_checkpoint`` for ``--resume`` -> its step; a checkpoint of another model than this run
    builds (another preset, --model-overrides or --grow-layers than the run was started with) is a one-line error."""
    try:
        return ckpt.load_checkpoint(path, check=False, **kw)["step"]
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), "")
        first = first if len(first) <= 160 else first[:157] + "..."
        raise SystemExit(f"--resume: {path} holds another model than this run builds ({first}); resume with the "
                         f"settings the run started with ({os.path.join(cfg.output_dir, 'config.json')}), or start "
                         "a new --output-dir") from None


def _resume_point(ckdir: str, main: bool) -> str | None:
    """The checkpoint ``--resume`` continues from: the newest whole one, naming the newer ones passed over; None
    where the run has none yet. A run whose checkpoints are all damaged stops instead of starting over."""
    say = (lambda m: print(f"--resume: {m}", flush=True)) if main else None
    if main:
        for name in ckpt.remove_partial(ckdir):
            print(f"--resume: removed {os.path.join(ckdir, name)} (a checkpoint a killed run left half-written)",
                  flush=True)
    path = ckpt.latest_checkpoint(ckdir, report=say)
    if path is None:
        if checkpoint_steps(ckdir):
            raise SystemExit(f"--resume: no checkpoint under {ckdir} is whole (the reasons are above); move them "
                             "away, or run without --resume to start from step 0")
        if main:
            print(f"--resume: no checkpoint under {ckdir} yet; starting from step 0", flush=True)
    return path


def train(cfg: TrainConfig, model: MFSRTransformer, loss_fn: Callable, *, name: str, extra: dict | None = None,
          student: bool = False) -> str:
    """Run the loop; ``loss_fn(model_for_grad, inner_model, batch, step, d) -> loss`` computes one step's loss, or
    ``-> (loss, parts)`` with ``parts`` a dict of detached scalar tensors (e.g. the raw squared errors under an
    adaptive weighting) that log.jsonl records beside it, from the main process's batch.

    Returns the path of the last checkpoint. ``extra`` is stored in every checkpoint (e.g. the teacher's path).
    ``student``: the run's samples (``--sample-every``) show 1 and 4 MeanFlow steps instead of one Euler step.
    """
    d = setup(cfg)
    # The data first: a missing, empty or image-less folder is one sentence before any work (no RNG is drawn here).
    on_device = cfg.degrade_on == "device" and not cfg.pool
    try:
        data = StepBatches(cfg, d.rank, d.world, degrade=not on_device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{name}: {e}") from None
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, d, model, name, extra)
    run.attach_data(data, on_device, student)
    try:
        step = run.loop(loss_fn)
    except Stop as e:
        if d.main:
            print(f"\n{e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        run.close()
    if d.main:
        print(f"done: {step} steps, {run.nonfinite} skipped as non-finite; checkpoint {run.last_path}", flush=True)
        if run.monitor is not None:
            from training.plot import plot_run

            try:
                print(f"curves: {plot_run(cfg.output_dir)}", flush=True)
            except ImportError:
                print("no curves: python -m training.plot needs matplotlib (pip install 'mfsr-fast[train]')",
                      flush=True)
    return run.last_path


class _Run:
    """One training run: the model, its EMA and optimizer resumed (``__init__``), the data and what watches the run
    (``attach_data``), one optimizer step (``step``), its log line (``log``), checkpoints (``save``) and the loop
    that ties them together with signals, time limits and non-finite steps (``loop``)."""

    def __init__(self, cfg: TrainConfig, d: Dist, model: MFSRTransformer, name: str, extra: dict | None):
        self.cfg, self.d, self.name, self.extra = cfg, d, name, extra
        self.model = model = model.to(d.device)
        self.ema = ema = copy.deepcopy(model).requires_grad_(False)
        self.fsdp = fsdp = cfg.fsdp and d.world > 1
        if cfg.fsdp and d.world == 1 and d.main:
            print("--fsdp: one process, nothing to shard; training unsharded", flush=True)
        self.ckdir = os.path.join(cfg.output_dir, "checkpoints")
        self.start = 0
        resume_from = _resume_point(self.ckdir, d.main) if cfg.resume else None
        if resume_from is not None and fsdp:
            # Weights load before sharding; the optimizer state after, through torch.distributed.checkpoint.
            self.start = _load_resumed(cfg, resume_from, model=model, ema=ema)
        if fsdp:
            shard_(model, d)
            shard_(ema, d)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        if resume_from is not None:
            if fsdp:
                _set_sharded_optimizer_state(model, self.opt, self.names, ckpt.load_optimizer_state(resume_from))
            else:
                self.start = _load_resumed(cfg, resume_from, model=model, optimizer=self.opt, ema=ema)
            if d.main:
                print(f"resumed from {resume_from} (step {self.start})", flush=True)
        if d.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            text = json.dumps(dataclasses.asdict(cfg), indent=2)
            print(f"{name} config:\n{text}", flush=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                f.write(text)
        if d.world > 1 and not fsdp:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                _Field(model), device_ids=[d.device.index] if d.device.type == "cuda" else None)
        else:  # one process, or FSDP2 (the sharded model is its own wrapper)
            self.wrapped = _Field(model)
        self.nonfinite = 0
        self.last_path = None
        self.restorer = self.monitor = self.log_file = self.bar = None
        self.old_handlers = {}

    def attach_data(self, data: StepBatches, on_device: bool, student: bool) -> None:
        """The batches (and R for crops degraded on the fly), the monitor, the loader, signal handlers, the log."""
        cfg, d = self.cfg, self.d
        self.data, self.on_device = data, on_device
        if d.main and data.pool is None and data.images.skipped:
            print(f"skipped {len(data.images.skipped)} unreadable images", flush=True)
        if self.model.needs_restorer and data.pool is None:  # R on each degraded LR crop, frozen, on the device
            from mfsr_fast.restorer import load_restorer

            try:
                self.restorer = load_restorer(self.model.cfg.restorer, device=d.device)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        if cfg.sample_every > 0:  # every rank runs it (an FSDP model's forward is collective); the main one writes
            from training.monitor import Monitor

            self.monitor = Monitor(cfg, data, self.model, student=student, device=d.device, main=d.main,
                                   restorer=self.restorer)
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(self.start, cfg.max_steps), num_workers=cfg.num_workers,
            prefetch_factor=2 if cfg.num_workers > 0 else None, persistent_workers=False,
            worker_init_fn=_ignore_signals, pin_memory=on_device and d.device.type == "cuda")
        self.signal = None

        def on_signal(signum, _frame):
            self.signal = signum

        self.old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log_file = open(os.path.join(cfg.output_dir, "log.jsonl"), "a") if d.main else None
        if d.main:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=self.start, desc=self.name, dynamic_ncols=True,
                            file=sys.stdout)

    def batch(self, item) -> tuple:
        """A loader item -> (hr, lr, R(LR) or None, seeds) on the training device."""
        d, data = self.d, self.data
        restored = None
        if data.pool is not None:
            hr, lr, restored, seeds = item
            hr, lr, restored = hr.to(d.device), lr.to(d.device), restored.to(d.device)
        elif self.on_device:
            hr, seeds = item
            hr, lr = degrade_samples(hr.to(d.device, non_blocking=True), seeds, data.degradation)
        else:
            hr, lr, seeds = item
            hr, lr = hr.to(d.device), lr.to(d.device)
        if self.restorer is not None:  # clone: a normal tensor, not the inference-mode one R returns
            restored = restore_crops(self.restorer, lr).clone()
        return hr, lr, restored, seeds

    def step(self, loss_fn: Callable, batch: tuple, step: int):
        """One optimizer step at the warmed-up learning rate -> (loss, gradient norm, finite on every rank, the
        loss's logged parts); a non-finite step changes nothing."""
        cfg, d, opt = self.cfg, self.d, self.opt
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and d.device.type == "cuda"):
            loss = loss_fn(self.wrapped, self.model, batch, step, d)
        loss, parts = loss if isinstance(loss, tuple) else (loss, {})
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(gnorm).item())
        if d.world > 1:  # every rank must take the same decision
            flag = torch.tensor([float(finite)], device=d.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if finite:
            opt.step()
            # EMA warm-up: early on the average follows the weights closely, so short runs do not keep a large share
            # of the initial weights (0.999^600 would still be 55% of them).
            ema_update(self.ema, self.model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        else:
            opt.zero_grad(set_to_none=True)
        return loss, gnorm, finite, parts

    def log(self, step: int, loss, gnorm, steps: int, seconds: float, parts: dict | None = None) -> None:
        """One log.jsonl line (main process), also to the monitor and the progress bar."""
        cfg = self.cfg
        rec = {"step": step, "loss": float(loss.item()), "grad_norm": float(gnorm),
               "lr": self.opt.param_groups[0]["lr"],
               "steps_per_s": steps / seconds, "images_per_s": steps * cfg.batch_size / seconds,
               "nonfinite_steps": self.nonfinite, "time": time.time()}
        rec.update({k: float(v) for k, v in (parts or {}).items()})
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        if self.monitor is not None:
            self.monitor.log_loss(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", **{k: f"{float(v):.4g}" for k, v in (parts or {}).items()},
                             it_s=f"{rec['steps_per_s']:.2f}", img_s=f"{rec['images_per_s']:.1f}")

    def save(self, at: int) -> str:
        """A checkpoint of step ``at`` (collective under FSDP: every rank gathers; the main one writes)."""
        d, path = self.d, None
        states = _gather_full_states(self.model, self.ema, self.opt, self.names) if self.fsdp else {}
        if d.main:
            try:
                path = ckpt.save_checkpoint(self.ckdir, at, model=self.model, optimizer=self.opt, ema=self.ema,
                                            config=dataclasses.asdict(self.cfg),
                                            extra=dict(self.extra or {}, nonfinite_steps=self.nonfinite),
                                            keep=self.cfg.keep_checkpoints, **states)
            except ckpt.CheckpointWriteError as e:
                raise Stop(str(e)) from None
        if d.world > 1:
            dist.barrier()
        return path

    def loop(self, loss_fn: Callable) -> int:
        """Steps from ``start`` to ``max_steps`` (or a signal, ``--max-minutes``, too many non-finite steps in a
        row), with logs, samples and checkpoints on their schedules; returns the last step."""
        cfg, d = self.cfg, self.d
        step = self.start
        consecutive = 0
        t0, done_since = time.perf_counter(), 0
        sampled = None
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else None
        for item in self.loader:
            loss, gnorm, finite, parts = self.step(loss_fn, self.batch(item), step)
            if finite:
                consecutive = 0
            else:
                self.nonfinite += 1
                consecutive += 1
                if consecutive >= cfg.max_nonfinite:
                    step += 1
                    self.last_path = self.save(step)
                    raise Stop(f"{consecutive} non-finite steps in a row (loss {loss.item()}); stopped at step "
                               f"{step}. The checkpoint {self.last_path} holds the weights from before the blow-up: "
                               "lower --lr or check the data, then continue with --resume")
            step += 1
            done_since += 1
            if d.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                self.log(step, loss, gnorm, done_since, time.perf_counter() - t0, parts)
                t0, done_since = time.perf_counter(), 0
            if self.bar is not None:
                self.bar.update(1)
            if self.monitor is not None and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                m0 = time.perf_counter()
                self.monitor(step, self.ema, self.log_file)
                sampled = step
                t0 += time.perf_counter() - m0  # the logged step rates (and export's train_seconds) leave it out
            if self.signal is not None:
                self.last_path = self.save(step)
                raise Stop(f"stopped by signal {signal.Signals(self.signal).name} at step {step}; checkpoint "
                           f"{self.last_path}; continue with --resume")
            if deadline is not None and _out_of_time(deadline, d):
                if d.main:
                    print(f"\n--max-minutes {cfg.max_minutes:g} reached at step {step}", flush=True)
                break
            if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                self.last_path = self.save(step)
        if step > self.start or self.last_path is None:
            self.last_path = self.save(step)
        if self.monitor is not None and sampled != step:  # stopped early (--max-minutes): the end's samples too
            self.monitor(step, self.ema, self.log_file)
        return step

    def close(self) -> None:
        for s, h in self.old_handlers.items():
            signal.signal(s, h)
        for thing in (self.bar, self.log_file, self.monitor):
            if thing is not None:
                thing.close()
        if self.d.world > 1:
            dist.destroy_process_group()


def shard_(model: MFSRTransformer, d: Dist) -> None:
    """Shard ``model`` in place with FSDP2 over all processes: each transformer block is one unit (its weights are
    gathered just before it runs and freed after), the embedders, prompts and output layers form the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _gather_full_states(model, ema, opt, names: list[str]) -> dict:
    """Full (unsharded) state dicts on rank 0, in the checkpoint's own format (optimizer keyed by index)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_options()
    msd = get_model_state_dict(model, options=opts)
    esd = get_model_state_dict(ema, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    if "state" not in osd:  # ranks other than 0 receive empty dicts (cpu_offload keeps the full copy on rank 0)
        return {}
    index = {n: i for i, n in enumerate(names)}
    by_index = {"state": {index[k]: v for k, v in osd["state"].items()},
                "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]}
    return {"model_state": msd, "ema_state": esd, "optimizer_state": by_index}


def _set_sharded_optimizer_state(model, opt, names: list[str], sd: dict) -> None:
    """Load an index-keyed full optimizer state into the sharded optimizer (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = {"state": {names[i]: v for i, v in sd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=_full_options())


class _Field(torch.nn.Module):
    """Module whose forward is ``model.field``: what DDP wraps (its forward is what DDP synchronises)."""

    def __init__(self, model: MFSRTransformer):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.field(*args, **kwargs)
