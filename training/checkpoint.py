"""Training checkpoints without pickle, written atomically, resumable bit-exactly.

Layout of ``<run>/checkpoints/step_00001000/``:
- ``model/`` and ``ema/``: diffusers ``save_pretrained`` folders (config.json + safetensors), with a student run's
  sampler (``sampler_config.json``), so that each is a complete model folder;
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param index>.<name>``;
- ``rng.safetensors``: torch CPU (and CUDA) generator states;
- ``trainer_state.json``: step, the optimizer's param groups and scalar state, Python and NumPy RNG states, the
  training config and anything else the trainer passes in ``extra``.
- ``manifest.json``: the size and SHA-256 of every file above, written last (``mfsr_fast.io.integrity``).
A checkpoint is written under a temporary name and renamed when complete; ``latest.json`` (replaced atomically) names
the newest complete one, so a crash mid-write leaves the previous checkpoint in charge. Resuming takes the newest
checkpoint whose files match its manifest (``latest_checkpoint``), naming the newer ones it passed over and why; old
checkpoints are rotated away only after a newer one is whole, and temporary folders a killed writer left are removed
by the next save. Files get the permissions the umask gives (not tempfile's private 0600 / 0700).

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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mfsr_fast.io.integrity import (
    CHECKPOINT_FILES,
    CHECKPOINT_FORMAT,
    LATEST,
    IntegrityError,
    apply_umask,
    check_checkpoint,
    checkpoint_steps,
    newest_checkpoint,
    write_manifest,
)
from mfsr_fast.sampling.config import SamplerConfig, save_sampler

__all__ = ["CHECKPOINT_FILES", "CheckpointWriteError", "IntegrityError", "checkpoint_bytes", "latest_checkpoint",
           "load_checkpoint", "load_optimizer_state", "remove_partial", "save_checkpoint"]

TMP_PREFIX = ".tmp-step_"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions): the message names the file; earlier checkpoints stay."""


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    apply_umask(tmp)
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


def _save_model(module, state: dict[str, torch.Tensor] | None, folder: str, sampler: SamplerConfig | None) -> None:
    """``save_pretrained``, or the same files from a gathered full state dict (FSDP2 modules hold shards); the
    sampler beside them."""
    if state is None:
        module.save_pretrained(folder, safe_serialization=True)
    else:
        _save_state(module, state, folder)
    if sampler is not None:
        save_sampler(sampler, folder)


def _save_state(module, state: dict[str, torch.Tensor], folder: str) -> None:
    """The files of ``save_pretrained`` from a gathered full state dict."""
    os.makedirs(folder, exist_ok=True)
    cfg = json.loads(module.to_json_string())
    # FSDP2 gives the module a subclass named FSDP<class>: record the model's own class.
    cfg["_class_name"] = next(c.__name__ for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def _tensor_bytes(module, state: dict | None) -> int:
    if state is not None:
        return sum(v.numel() * v.element_size() for v in state.values())
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def checkpoint_bytes(model, optimizer=None, ema=None, model_state=None, ema_state=None, optimizer_state=None) -> int:
    """About how many bytes a checkpoint of these takes (the tensors; JSON and headers are small)."""
    n = _tensor_bytes(model, model_state)
    if ema is not None:
        n += _tensor_bytes(ema, ema_state)
    if optimizer is not None or optimizer_state is not None:
        sd = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        n += sum(v.numel() * v.element_size() for st in sd["state"].values() for v in st.values()
                 if isinstance(v, torch.Tensor))
    return n


def remove_partial(root: str) -> list[str]:
    """Remove the temporary folders of checkpoints whose writer was killed mid-write; returns their names."""
    gone = []
    if os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if d.startswith(TMP_PREFIX) and os.path.isdir(os.path.join(root, d)):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                gone.append(d)
    return gone


def save_checkpoint(root: str, step: int, *, model, optimizer: torch.optim.Optimizer | None = None, ema=None,
                    config: dict | None = None, extra: dict | None = None, keep: int = 3,
                    model_state: dict | None = None, ema_state: dict | None = None,
                    optimizer_state: dict | None = None, sampler: SamplerConfig | None = None) -> str:
    """Write ``root/step_<step>/`` atomically, point ``root/latest.json`` at it, keep the newest ``keep``.

    ``model_state`` / ``ema_state`` / ``optimizer_state``: full state dicts gathered from sharded (FSDP2) modules,
    written instead of the modules' own (the optimizer's keyed by parameter index, as ``optimizer.state_dict()``).
    ``sampler``: a student's, written beside the weights of ``model/`` and ``ema/``.
    A failed write (disk full, ...) raises ``CheckpointWriteError`` naming the file, the space needed and the space
    free, and leaves every earlier checkpoint as it was."""
    os.makedirs(root, exist_ok=True)
    remove_partial(root)  # one writer per run: any temporary folder here is a killed writer's leftover
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{step:08d}-")
    current = tmp
    try:
        current = os.path.join(tmp, "model")
        _save_model(model, model_state, current, sampler)
        if ema is not None:
            current = os.path.join(tmp, "ema")
            _save_model(ema, ema_state, current, sampler)
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "config": config or {}, "extra": extra or {}}
        if optimizer is not None or optimizer_state is not None:
            tensors, opt_meta = _optimizer_to_files(optimizer, optimizer_state)
            current = os.path.join(tmp, "optimizer.safetensors")
            save_file(tensors, current)
            meta["optimizer"] = opt_meta
        rng_tensors, meta["rng"] = _rng_state()
        current = os.path.join(tmp, "rng.safetensors")
        save_file(rng_tensors, current)
        current = os.path.join(tmp, "trainer_state.json")
        with open(current, "w") as f:
            json.dump(meta, f)
        current = os.path.join(tmp, "manifest.json")
        write_manifest(tmp)
        apply_umask(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports I/O failures (a full disk included) as SafetensorError, not OSError.
        if isinstance(e, (OSError, SafetensorError)) and not isinstance(e, CheckpointWriteError):
            raise _write_error(e, root, current, step, model, optimizer, ema, model_state, ema_state,
                               optimizer_state) from e
        raise
    _atomic_write_text(os.path.join(root, LATEST), json.dumps({"step": step, "path": os.path.basename(final)}))
    # Rotation: only checkpoints older than the one just written (which is whole) go, the newest keep - 1 of them
    # stay. Newer step_* folders (damaged ones a resume passed over) are left for the user to inspect.
    older = [name for s_, name in checkpoint_steps(root) if s_ < step]
    for old in older[max(0, keep - 1):] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _write_error(e: BaseException, root, current, step, *sizes) -> CheckpointWriteError:
    free = shutil.disk_usage(root).free
    need = checkpoint_bytes(*sizes)
    why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return CheckpointWriteError(
        f"could not write checkpoint step {step}: {current}: {why}. The checkpoint needs about {need / 2**20:.1f} MiB "
        f"and {free / 2**20:.1f} MiB are free on {root}; earlier checkpoints are intact (free some space, then "
        "continue with --resume)")


def latest_checkpoint(root: str, report=None) -> str | None:
    """The newest whole checkpoint under root (its files match its manifest), or None. ``report(message)`` is told
    about every newer checkpoint passed over, with the reason."""
    path, skipped = newest_checkpoint(root)
    if report is not None:
        for name, why in skipped:
            report(f"skipping {os.path.join(root, name)}: {why}")
    return path


def load_optimizer_state(path: str) -> dict:
    """The optimizer state of a checkpoint as an index-keyed ``optimizer.state_dict()`` (for sharded optimizers)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state")
    return _optimizer_from_files(None, load_file(os.path.join(path, "optimizer.safetensors")), meta["optimizer"])


def load_checkpoint(path: str, *, model, optimizer: torch.optim.Optimizer | None = None, ema=None,
                    restore_rng: bool = True, check: bool = True) -> dict:
    """Load weights, optimizer and RNG state in place; returns the trainer state (step, config, extra).

    ``check``: verify the files against the checkpoint's manifest first (``IntegrityError`` naming the damaged file);
    pass False for a checkpoint ``latest_checkpoint`` has just verified."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    if check:
        check_checkpoint(path)
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
