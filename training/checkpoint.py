"""Training checkpoints without pickle, written atomically, resumable bit-exactly.

Layout of ``<run>/checkpoints/step_00001000/``:
- ``model/`` and ``ema/``: diffusers ``save_pretrained`` folders (config.json + safetensors);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param index>.<name>``;
- ``rng.safetensors``: torch CPU (and CUDA) generator states;
- ``trainer_state.json``: step, the optimizer's param groups and scalar state, Python and NumPy RNG states, the
  training config and anything else the trainer passes in ``extra``.
A checkpoint is written under a temporary name and renamed when complete; ``latest.json`` (replaced atomically) names
the newest complete one, so a crash mid-write leaves the previous checkpoint in charge.

Caution:
- Optimizer states must be tensors or JSON values (true of torch's optimizers); param groups must be JSON values.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_to_files(opt: torch.optim.Optimizer | None, sd: dict | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    sd = sd if sd is not None else opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _optimizer_from_files(opt: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Load into ``opt`` (or, with ``opt=None``, return the index-keyed state dict)."""
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta["scalar_state"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    sd = {"state": state, "param_groups": groups}
    if opt is not None:
        opt.load_state_dict(sd)
    return sd


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _save_model(module, state: dict[str, torch.Tensor] | None, folder: str) -> None:
    """``save_pretrained``, or the same files from a gathered full state dict (FSDP2 modules hold shards)."""
    if state is None:
        module.save_pretrained(folder, safe_serialization=True)
        return
    os.makedirs(folder, exist_ok=True)
    cfg = json.loads(module.to_json_string())
    # FSDP2 gives the module a subclass named FSDP<class>: record the model's own class.
    cfg["_class_name"] = next(c.__name__ for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def save_checkpoint(root: str, step: int, *, model, optimizer: torch.optim.Optimizer | None = None, ema=None,
                    config: dict | None = None, extra: dict | None = None, keep: int = 3,
                    model_state: dict | None = None, ema_state: dict | None = None,
                    optimizer_state: dict | None = None) -> str:
    """Write ``root/step_<step>/`` atomically, point ``root/latest.json`` at it, keep the newest ``keep``.

    ``model_state`` / ``ema_state`` / ``optimizer_state``: full state dicts gathered from sharded (FSDP2) modules,
    written instead of the modules' own (the optimizer's keyed by parameter index, as ``optimizer.state_dict()``)."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-")
    try:
        _save_model(model, model_state, os.path.join(tmp, "model"))
        if ema is not None:
            _save_model(ema, ema_state, os.path.join(tmp, "ema"))
        meta = {"step": step, "config": config or {}, "extra": extra or {}}
        if optimizer is not None or optimizer_state is not None:
            tensors, opt_meta = _optimizer_to_files(optimizer, optimizer_state)
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        rng_tensors, meta["rng"] = _rng_state()
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(meta, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(os.path.join(root, LATEST), json.dumps({"step": step, "path": os.path.basename(final)}))
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under root, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = json.load(f)["path"]
    full = os.path.join(root, name)
    return full if os.path.isdir(full) else None


def load_optimizer_state(path: str) -> dict:
    """The optimizer state of a checkpoint as an index-keyed ``optimizer.state_dict()`` (for sharded optimizers)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state")
    return _optimizer_from_files(None, load_file(os.path.join(path, "optimizer.safetensors")), meta["optimizer"])


def load_checkpoint(path: str, *, model, optimizer: torch.optim.Optimizer | None = None, ema=None,
                    restore_rng: bool = True) -> dict:
    """Load weights, optimizer and RNG state in place; returns the trainer state (step, config, extra)."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    model.load_state_dict(load_file(os.path.join(path, "model", "diffusion_pytorch_model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema", "diffusion_pytorch_model.safetensors")))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path} holds no optimizer state")
        _optimizer_from_files(optimizer, load_file(os.path.join(path, "optimizer.safetensors")), meta["optimizer"])
    if restore_rng:
        _set_rng_state(load_file(os.path.join(path, "rng.safetensors")), meta["rng"])
    return meta
