"""Folders of safetensors shards written atomically and resumable: a sample pool (``training.pool``: HR crops, their
degraded LR and R(LR)) and the teacher's stored samples (``training.trajectories``). ``Pool`` reads a built pool.

A pool's layout: ``pool.json`` (settings, count, restorer provenance) and shards ``shard_NNNNN.safetensors`` with
``hr`` (N, 3, crop, crop) fp16, ``lr`` (N, 3, crop / 4, crop / 4) uint8 (exactly the 8-bit LR) and ``restored``
(N, 3, crop, crop) fp16.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


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
