"""The teacher's many-step samples on a pool, for trajectory distillation: ``python -m training.trajectories``.

For pool samples 0 .. count - 1 this draws a noise e (its own seed per sample) and integrates the teacher from e
at t = 1 to t = 0 as the evaluation's ``teacher:N[:cfgW][:refineT][:aboveT]`` does (``sample_teacher``), giving
the teacher's sample x_T(e | LR), in the flow's space. ``training.distill --trajectories DIR`` then adds a
regression of the student's one step from e onto x_T to the MeanFlow loss (DESIGN section 8): the MeanFlow target
only reaches the teacher's many-step samples through its own, slowly improving, tangent, while a pair (e, x_T)
states the one-step map outright (Luhman and Luhman 2021, "Knowledge distillation in iterative generative models").

Layout: ``trajectories.json`` (settings, the pool's and the teacher's provenance) and shards
``shard_NNNNN.safetensors`` with ``noise`` and ``sample`` (N, C, H, W) fp16 (the noise rounded to fp16 before the
teacher sees it, so each stored pair is exact), plus the conditioning the teacher saw: ``lr`` (N, 3, crop / 4,
crop / 4) uint8 and ``restored`` (N, 3, crop, crop) fp16, copied from the pool. Shards are written atomically, so
an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

from mfsr_fast.evaluation.methods import parse_sampling
from mfsr_fast.models.conditioning import lr_condition
from mfsr_fast.pipeline.loading import resolve_device
from mfsr_fast.sampling.guidance import sample_teacher
from training.components import codec_for, resolve_teacher, weights_digest
from training.shards import Pool, open_shards, save_shard, shard_path

NOISE_SALT = 0x7E57_A11  # the noise seeds differ from the pool's and the training draws' seeds
DRAW_SALT = 0x7E57_A11  # distill's per-step choice of pairs (seeded by step and rank, apart from its other draws)


def noise_for(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Sample ``index``'s noise, rounded to fp16 (as stored)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) ^ NOISE_SALT)
    return torch.randn(shape, generator=g).half()


def build(out: str, *, pool: str, teacher: str, count: int, steps: int, sampling: str, seed: int = 0,
          batch: int = 16, shard: int = 128, teacher_ema: bool = True, threads: int = 0, device: str = "cpu") -> str:
    if count < 1 or steps < 1 or batch < 1 or shard < 1:
        raise SystemExit("--count, --steps, --batch and --shard must be >= 1")
    try:
        how = parse_sampling([p for p in sampling.split(":") if p], flat=False)
    except ValueError as e:
        raise SystemExit(f"--sampling {sampling!r}: bad part {e} (cfgW, refineT, aboveT joined by ':', e.g. "
                         "cfg1.25:refine0.5:above0.5)") from None
    try:
        source = Pool(pool)
    except ValueError as e:
        raise SystemExit(f"--pool: {e}") from None
    if count > len(source):
        raise SystemExit(f"--count {count}: the pool {pool} holds {len(source)} samples")
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    model = resolve_teacher(teacher, teacher_ema)[0].float().eval().requires_grad_(False).to(dev)
    if not model.needs_restorer:
        raise SystemExit("--teacher: this builder is for restorer-conditioned teachers (a pool holds R(LR))")
    codec = codec_for(model)
    settings = {"pool": os.path.abspath(pool), "pool_seed": source.meta["seed"], "pool_count": source.count,
                "count": count, "steps": steps, "sampling": sampling, "guidance": how.guidance,
                "against": how.against, "refine_t": how.refine_t, "interval": list(how.interval), "seed": seed,
                "shard_size": shard, "teacher": os.path.abspath(teacher), "teacher_ema": teacher_ema,
                "teacher_weights": weights_digest(model)}
    _write_settings(out, settings)
    t0 = time.perf_counter()
    for k in range(-(-count // shard)):
        path = shard_path(out, k)
        if not os.path.isfile(path):
            save_shard(path, _sample_shard(k, model, codec, source, how, count=count, steps=steps, seed=seed,
                                           batch=batch, shard=shard, device=dev))
    print(f"{count} teacher samples in {out} ({time.perf_counter() - t0:.0f} s this run)")
    return out


def _write_settings(out: str, settings: dict) -> None:
    """``out/trajectories.json``; a folder that holds samples of another teacher or other settings is refused."""
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "trajectories.json")
    if os.path.isfile(meta_path):
        old = json.load(open(meta_path))
        # Same teacher: the same weights (a folder from before the digest was recorded: the same teacher path; it
        # gains the digest now).
        digest = old.get("teacher_weights")
        if (digest != settings["teacher_weights"]) if digest else (old.get("teacher") != settings["teacher"]):
            raise SystemExit(f"{out} holds samples of another teacher ({meta_path}: {old.get('teacher', '?')}, "
                             f"weights {digest[:12] if digest else 'not recorded'}; this one's "
                             f"{settings['teacher_weights'][:12]}); use another folder")
        keys = [k for k in settings if k not in ("pool", "teacher", "teacher_weights")]
        if any(old.get(k) != settings[k] for k in keys):
            raise SystemExit(f"{out} holds trajectories built with other settings ({meta_path}); use another folder")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def _sample_shard(k: int, model, codec, source, how, *, count: int, steps: int, seed: int, batch: int, shard: int,
                  device) -> dict[str, torch.Tensor]:
    """Shard ``k``'s tensors: for its pool samples, the noise, the teacher's sample from it and the conditioning."""
    idx = list(range(k * shard, min(count, (k + 1) * shard)))
    parts: dict[str, list[torch.Tensor]] = {"noise": [], "sample": [], "lr": [], "restored": []}
    t0 = time.perf_counter()
    for i in range(0, len(idx), batch):
        items = [source[j] for j in idx[i:i + batch]]
        hr, lr, restored = (torch.stack(x) for x in zip(*items))
        c = lr_condition(model, codec, lr.to(device), restored.to(device))
        shape = tuple(model.to_flow(codec.encode(hr.to(device)), c).shape[1:])
        e = torch.stack([noise_for(seed, j, shape) for j in idx[i:i + batch]])  # drawn on the CPU: any device
        x = sample_teacher(model, c, e.float().to(device), steps=steps, guidance=how).cpu()
        parts["noise"].append(e)
        parts["sample"].append(x.half())
        parts["lr"].append((lr * 255).round().to(torch.uint8))
        parts["restored"].append(restored.half())
        done = i + len(items)
        print(f"shard {k}: {done}/{len(idx)} ({(time.perf_counter() - t0) / done:.2f} s per sample)", flush=True)
    return {n: torch.cat(v).contiguous() for n, v in parts.items()}


class Trajectories:
    """A built folder, in memory: ``noise``, ``sample`` (flow space), ``lr`` and ``restored`` (float in [0, 1]),
    each (N, ...). ``take(idx)`` -> the four for those indices."""

    def __init__(self, root: str):
        self.meta, paths = open_shards(root, "trajectories.json", "training.trajectories")
        shards = [load_file(p) for p in paths]
        self.tensors = {name: torch.cat([s[name] for s in shards]) for name in ("noise", "sample", "lr", "restored")}
        if len(self) != self.meta["count"]:
            raise ValueError(f"{root}: the shards hold {len(self)} samples, trajectories.json says "
                             f"{self.meta['count']}")

    def __len__(self) -> int:
        return self.tensors["noise"].shape[0]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.tensors
        return (t["noise"][idx].float(), t["sample"][idx].float(), t["lr"][idx].float() / 255,
                t["restored"][idx].float())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (an interrupted build resumes)")
    ap.add_argument("--pool", required=True, help="a sample pool (python -m training.pool)")
    ap.add_argument("--teacher", required=True, help="the teacher: run, checkpoint or save_pretrained folder")
    ap.add_argument("--no-teacher-ema", dest="teacher_ema", action="store_false",
                    help="from a training checkpoint, its raw weights instead of the EMA")
    ap.add_argument("--count", type=int, default=512, help="pool samples 0 .. count - 1 (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="teacher Euler steps (default: %(default)s)")
    ap.add_argument("--sampling", default="cfg1.25:refine0.5:above0.5",
                    help="how the teacher is sampled, as in the evaluation's teacher:N:...: cfgW, refineT, aboveT "
                         "joined by ':' (default: %(default)s; '' for plain unguided Euler steps)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="samples per teacher pass")
    ap.add_argument("--shard", type=int, default=128, help="samples per shard file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the teacher runs: cpu, cuda, cuda:N or auto (default: "
                    "%(default)s); the noise is drawn on the CPU, so the stored pairs do not depend on it")
    args = ap.parse_args(argv)
    build(args.out, pool=args.pool, teacher=args.teacher, count=args.count, steps=args.steps,
          sampling=args.sampling, seed=args.seed, batch=args.batch, shard=args.shard,
          teacher_ema=args.teacher_ema, threads=args.threads, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
