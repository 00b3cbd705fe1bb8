"""A precomputed pool of restorer-conditioned training samples: ``python -m training.pool --out DIR``.

Each sample is an HR crop's training target (the USM-sharpened crop), its degraded LR (training/degrade.py) and the
restorer's output on that LR, R(LR) (DESIGN section 8). On a GPU the restorer runs inside the training loop; on a
CPU it costs far more than the small model's step (Real-ESRGAN x4plus: about 0.3 s per 32 px LR crop on 2 cores),
so it is computed once here and ``--pool DIR`` trains from the pool (each use of a sample still gets fresh noise,
time and prompt draws from its own seed, and a random horizontal flip of all three images).

Layout: ``pool.json`` (settings, count, restorer provenance) and shards ``shard_NNNNN.safetensors`` with ``hr``
(N, 3, crop, crop) fp16, ``lr`` (N, 3, crop / 4, crop / 4) uint8 (exactly the 8-bit LR) and ``restored`` (N, 3,
crop, crop) fp16. Shards are written atomically, so an interrupted build resumes where it stopped. Sample i is
sample (i // shard, i % shard) of the seeded training batches (engine.StepBatches), so a pool is reproducible from
its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

PAD = 4  # LR pixels of reflected context around a crop for the restorer (its borders otherwise see zeros)


def restore_crops(restorer, lr: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """R on LR crops (B, 3, h, w) with ``pad`` reflected pixels around each (cut off after) -> (B, 3, 4h, 4w)."""
    s = restorer.scale
    if pad > 0:
        p = min(pad, lr.shape[-1] - 1, lr.shape[-2] - 1)
        out = restorer(torch.nn.functional.pad(lr, (p, p, p, p), mode="reflect"))
        return out[:, :, s * p:out.shape[-2] - s * p, s * p:out.shape[-1] - s * p]
    return restorer(lr)


def shard_path(root: str, k: int) -> str:
    return os.path.join(root, f"shard_{k:05d}.safetensors")


def open_shards(root: str, meta_name: str, command: str) -> tuple[dict, list[str]]:
    """A built shard folder (a pool, training.trajectories): its settings ``meta_name`` and its shard paths, all
    present; ValueError naming ``command`` (which builds or finishes it) otherwise."""
    meta_path = os.path.join(root, meta_name)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{root}: no {meta_name}; build one with python -m {command}")
    with open(meta_path) as f:
        meta = json.load(f)
    paths = [shard_path(root, k) for k in range(-(-meta["count"] // meta["shard_size"]))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{root}: {len(missing)} of {len(paths)} shards missing (e.g. {missing[0]}): finish the "
                         f"build with python -m {command} (same settings)")
    return meta, paths


def save_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Written atomically: a build stopped mid-write leaves no shard that looks whole."""
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


class Pool:
    """Random access to a built pool: ``pool[i]`` -> (hr, lr, restored) as float tensors in [0, 1]."""

    def __init__(self, root: str):
        self.meta, self._paths = open_shards(root, "pool.json", "training.pool --out")
        self.root = root
        self.shard = self.meta["shard_size"]
        self.count = self.meta["count"]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def crop(self) -> int:
        return self.meta["crop"]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, j = divmod(int(i), self.shard)
        if k not in self._cache:
            self._cache[k] = load_file(self._paths[k])
        s = self._cache[k]
        return s["hr"][j].float(), s["lr"][j].float() / 255, s["restored"][j].float()


def build(out: str, *, data: str, count: int, crop: int, degradation: str, seed: int, shard: int = 256,
          restorer: str = "realesrgan-x4plus", device: str = "cpu", threads: int = 0) -> str:
    from mfsr_fast.restorer import load_restorer
    from training import engine

    if count < 1 or shard < 1 or crop % 4:
        raise SystemExit("--count and --shard must be >= 1, --crop a multiple of 4")
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        R = load_restorer(restorer, device=device)
    except ValueError as e:
        raise SystemExit(f"--restorer: {e}") from None
    settings = {"data": os.path.abspath(data), "count": count, "crop": crop, "degradation": degradation, "seed": seed,
                "shard_size": shard, "restorer": restorer, "restorer_pad": PAD}
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "pool.json")
    if os.path.isfile(meta_path):
        old = json.load(open(meta_path))
        same = {k: old.get(k) for k in settings if k != "data"} == {k: v for k, v in settings.items() if k != "data"}
        if not same:
            raise SystemExit(f"{out} holds a pool built with other settings ({meta_path}); use another folder")
    info = os.path.join(R.path, "info.json")
    settings["restorer_info"] = json.load(open(info)) if os.path.isfile(info) else {"path": R.path}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    cfg = engine.TrainConfig(data=data, crop=crop, degradation=degradation, seed=seed, batch_size=shard,
                             max_steps=-(-count // shard))
    batches = engine.StepBatches(cfg, 0, 1)
    from tqdm import tqdm

    bar = tqdm(total=count, desc="pool", unit="sample", file=sys.stdout)
    t0 = time.perf_counter()
    for k in range(cfg.max_steps):
        n = min(shard, count - k * shard)
        path = shard_path(out, k)
        if os.path.isfile(path):
            bar.update(n)
            continue
        hr, lr, _ = batches[k]
        hr, lr = hr[:n], lr[:n]
        restored = torch.cat([restore_crops(R, lr[i:i + 8].to(R.device)).cpu() for i in range(0, n, 8)])
        tensors = {"hr": hr.half().contiguous(), "lr": (lr * 255).round().to(torch.uint8).contiguous(),
                   "restored": restored.half().contiguous()}
        save_shard(path, tensors)
        bar.update(n)
    bar.close()
    print(f"pool of {count} samples in {out} ({time.perf_counter() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    from training.degrade import PRESETS as DEGRADATIONS
    from training.engine import DEFAULT_DATA

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="pool folder (an interrupted build resumes)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="HR image folder (default: %(default)s)")
    ap.add_argument("--count", type=int, default=3072)
    ap.add_argument("--crop", type=int, default=128, help="HR crop side (LR is crop / 4)")
    ap.add_argument("--degradation", default="dit4sr", choices=sorted(DEGRADATIONS),
                    help="training/degrade.py preset (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", type=int, default=256, help="samples per shard file")
    ap.add_argument("--restorer", default="realesrgan-x4plus", help="restorer name or folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    build(args.out, data=args.data, count=args.count, crop=args.crop, degradation=args.degradation, seed=args.seed,
          shard=args.shard, restorer=args.restorer, device=args.device, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
