"""The training loop shared by ``python -m training.teacher`` and ``python -m training.distill``.

What it gives both commands (their settings: ``training.config``; their data: ``training.batches``; several
processes: ``training.distributed``):
- AdamW with linear warm-up, gradient clipping, EMA weights, bf16 autocast on CUDA;
- checkpoints (``training.checkpoint``) every ``ckpt_every`` steps, at the end, and on SIGTERM/SIGINT; ``--resume``
  continues from the newest whole one; a student run's sampler (``SamplerConfig``) is stored in each, so a
  checkpoint is a complete model folder;
- a non-finite loss or gradient skips the step and is counted; ``max_nonfinite`` in a row stop the run with a message
  and a checkpoint of the weights from before the blow-up (skipped steps change nothing);
- tqdm progress (loss, steps/s, images/s), a JSONL log ``<output-dir>/log.jsonl`` and, with ``--sample-every``, the
  run watched (``training.monitor``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from mfsr_fast.io.integrity import checkpoint_steps
from mfsr_fast.models.restorer import load_restorer, restore_crops
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.sampling.config import SamplerConfig
from training import checkpoint as ckpt
from training.batches import StepBatches, degrade_samples
from training.config import TrainConfig
from training.distributed import (
    Dist,
    FieldModule,
    gather_full_states,
    set_sharded_optimizer_state,
    setup,
    shard_,
)
from training.monitor import Monitor
from training.plot import plot_run
from training.runfolder import claim, rewind_log

# EMA.


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)


# The loop.


class Stop(Exception):
    pass


def ignore_signals(_worker_id: int) -> None:
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
          sampler: SamplerConfig | None = None) -> str:
    """Run the loop; ``loss_fn(model_for_grad, inner_model, batch, step, d) -> loss`` computes one step's loss, or
    ``-> (loss, parts)`` with ``parts`` a dict of detached scalar tensors (e.g. the raw squared errors under an
    adaptive weighting) that log.jsonl records beside it, from the main process's batch.

    Returns the path of the last checkpoint. ``extra`` is stored in every checkpoint (e.g. the teacher's path).
    ``sampler``: a student run's sampler, stored in every checkpoint beside the weights; the run's samples
    (``--sample-every``) then show 1 and 4 MeanFlow steps with it instead of a teacher's one Euler step.
    """
    overrides = claim(cfg)  # a folder holds one run; a resumed one keeps its settings unless told otherwise
    d = setup(cfg)
    # The data first: a missing, empty or image-less folder is one sentence before any work (no RNG is drawn here).
    on_device = cfg.degrade_on == "device" and not cfg.pool
    try:
        data = StepBatches(cfg, d.rank, d.world, degrade=not on_device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{name}: {e}") from None
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, d, model, name, extra, sampler, overrides)
    run.attach_data(data, on_device)
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

    def __init__(self, cfg: TrainConfig, d: Dist, model: MFSRTransformer, name: str, extra: dict | None,
                 sampler: SamplerConfig | None, overrides: dict | None = None):
        self.cfg, self.d, self.name, self.extra, self.sampler = cfg, d, name, extra, sampler
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
                set_sharded_optimizer_state(model, self.opt, self.names, ckpt.load_optimizer_state(resume_from))
            else:
                self.start = _load_resumed(cfg, resume_from, model=model, optimizer=self.opt, ema=ema)
            if d.main:
                print(f"resumed from {resume_from} (step {self.start})", flush=True)
        if d.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if cfg.resume:  # the log goes on from the checkpoint, with the deliberate changes recorded
                rewind_log(cfg.output_dir, self.start, overrides or {})
                for k, (old, new) in (overrides or {}).items():
                    print(f"--override {k}: {json.dumps(old)} -> {json.dumps(new)} (recorded in log.jsonl)",
                          flush=True)
            text = json.dumps(dataclasses.asdict(cfg), indent=2)
            print(f"{name} config:\n{text}", flush=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                f.write(text)
        if d.world > 1 and not fsdp:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                FieldModule(model), device_ids=[d.device.index] if d.device.type == "cuda" else None)
        else:  # one process, or FSDP2 (the sharded model is its own wrapper)
            self.wrapped = FieldModule(model)
        self.nonfinite = 0
        self.last_path = None
        self.restorer = self.monitor = self.log_file = self.bar = None
        self.old_handlers = {}

    def attach_data(self, data: StepBatches, on_device: bool) -> None:
        """The batches (and R for crops degraded on the fly), the monitor, the loader, signal handlers, the log."""
        cfg, d = self.cfg, self.d
        self.data, self.on_device = data, on_device
        if d.main and data.pool is None and data.images.skipped:
            print(f"skipped {len(data.images.skipped)} unreadable images", flush=True)
        if self.model.needs_restorer and data.pool is None:  # R on each degraded LR crop, frozen, on the device
            try:
                self.restorer = load_restorer(self.model.cfg.restorer, device=d.device)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        if cfg.sample_every > 0:  # every rank runs it (an FSDP model's forward is collective); the main one writes
            self.monitor = Monitor(cfg, data, self.model, sampler=self.sampler, device=d.device, main=d.main,
                                   restorer=self.restorer)
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(self.start, cfg.max_steps), num_workers=cfg.num_workers,
            prefetch_factor=2 if cfg.num_workers > 0 else None, persistent_workers=False,
            worker_init_fn=ignore_signals, pin_memory=on_device and d.device.type == "cuda")
        self.signal = None

        def on_signal(signum, _frame):
            self.signal = signum

        self.old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log_file = open(os.path.join(cfg.output_dir, "log.jsonl"), "a") if d.main else None
        if d.main:
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
        states = gather_full_states(self.model, self.ema, self.opt, self.names) if self.fsdp else {}
        if d.main:
            try:
                path = ckpt.save_checkpoint(self.ckdir, at, model=self.model, optimizer=self.opt, ema=self.ema,
                                            config=dataclasses.asdict(self.cfg),
                                            extra=dict(self.extra or {}, nonfinite_steps=self.nonfinite),
                                            keep=self.cfg.keep_checkpoints, sampler=self.sampler, **states)
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
