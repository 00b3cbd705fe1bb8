"""One step's samples, each from its own seed: sample j of the global batch at step s is drawn from (seed, s, j) -- its
HR crop, its degradation, the noise, t, r and the prompt choice -- so a resumed run and a run split over N processes
see exactly the batches of one uninterrupted single process."""

from __future__ import annotations

import torch

from training.config import TrainConfig
from training.data import ImageFolder
from training.degrade import PRESETS as DEGRADATIONS
from training.degrade import degrade
from training.shards import Pool


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
