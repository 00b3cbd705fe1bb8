"""Several processes (torchrun): DDP over gloo (CPU) or NCCL (GPU), or FSDP2 (``--fsdp``: weights, gradients and
optimizer state sharded, one unit per transformer block), with full state dicts gathered to rank 0 in the
checkpoint's own format, so a sharded run resumes from a single-process checkpoint and the other way round."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.pipeline.loading import resolve_device
from training.config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def training_device(want: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) -> this process's device (``pipeline.loading.resolve_device``, the one
    resolver); under torchrun, the local rank's GPU."""
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


def shard_(model: MFSRTransformer, d: Dist) -> None:
    """Shard ``model`` in place with FSDP2 over all processes: each transformer block is one unit (its weights are
    gathered just before it runs and freed after), the embedders, prompts and output layers form the root unit."""
    mesh = init_device_mesh(d.device.type, (d.world,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_states(model, ema, opt, names: list[str]) -> dict:
    """Full (unsharded) state dicts on rank 0, in the checkpoint's own format (optimizer keyed by index)."""
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


def set_sharded_optimizer_state(model, opt, names: list[str], sd: dict) -> None:
    """Load an index-keyed full optimizer state into the sharded optimizer (each rank keeps its shard)."""
    by_name = {"state": {names[i]: v for i, v in sd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=_full_options())


class FieldModule(torch.nn.Module):
    """Module whose forward is ``model.field``: what DDP wraps (its forward is what DDP synchronises)."""

    def __init__(self, model: MFSRTransformer):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.field(*args, **kwargs)
