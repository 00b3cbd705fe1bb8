"""A precomputed pool of restorer-conditioned training samples: ``python -m training.pool --out DIR``.

Each sample is an HR crop's training target (the USM-sharpened crop), its degraded LR (training/degrade.py) and the
restorer's output on that LR, R(LR) (DESIGN section 8). On a GPU the restorer runs inside the training loop; on a
CPU it costs far more than the small model's step, so it is computed once here and ``--pool DIR`` trains from the
pool (each use of a sample still gets fresh noise, time and prompt draws from its own seed, and a random horizontal
flip of all three images). Layout: ``training.shards``. Shards are written atomically, so an interrupted build
resumes where it stopped. Sample i is sample (i // shard, i % shard) of the seeded training batches
(``batches.StepBatches``), so a pool is reproducible from its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from mfsr_fast.models.restorer import CROP_PAD, load_restorer, restore_crops
from training.batches import StepBatches
from training.config import DEFAULT_DATA, TrainConfig
from training.degrade import PRESETS as DEGRADATIONS
from training.shards import save_shard, shard_path


def build(out: str, *, data: str, count: int, crop: int, degradation: str, seed: int, shard: int = 256,
          restorer: str = "realesrgan-x4plus", device: str = "cpu", threads: int = 0) -> str:
    if count < 1 or shard < 1 or crop % 4:
        raise SystemExit("--count and --shard must be >= 1, --crop a multiple of 4")
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        R = load_restorer(restorer, device=device)
    except ValueError as e:
        raise SystemExit(f"--restorer: {e}") from None
    settings = {"data": os.path.abspath(data), "count": count, "crop": crop, "degradation": degradation, "seed": seed,
                "shard_size": shard, "restorer": restorer, "restorer_pad": CROP_PAD}
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
    cfg = TrainConfig(data=data, crop=crop, degradation=degradation, seed=seed, batch_size=shard,
                             max_steps=-(-count // shard))
    batches = StepBatches(cfg, 0, 1)
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
