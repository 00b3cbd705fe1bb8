"""A training run's folder holds one run.

``claim`` runs before any work. A new run (no ``--resume``) refuses a folder that already holds a run's files, so
that it never starts over on top of one and a later ``--resume`` never mixes the two. A resumed run refuses settings
that differ from the ones the run recorded in its ``config.json``, unless they are named in ``--override`` as
deliberate changes; what may change between two legs of a run without changing what it computes (its length, its
schedules, its threads and workers, where it runs) is free.

``rewind_log`` keeps ``log.jsonl`` one history: a resumed run drops the rows logged after the checkpoint it continues
from (the steps it is about to redo) and records the overrides, old and new values, in a row of their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from mfsr_fast.io.integrity import apply_umask

RUN_FILES = ("config.json", "log.jsonl", "checkpoints", "samples", "tensorboard")
FREE = frozenset({"resume", "override", "output_dir", "max_steps", "max_minutes", "ckpt_every", "keep_checkpoints",
                  "log_every", "num_workers", "threads", "device", "fsdp", "sample_every", "sample_count", "val_data",
                  "val_count", "niqe_params", "tensorboard"})


def _plain(value):
    """A setting as its config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(value))


def claim(cfg) -> dict[str, list]:
    """Check that ``cfg`` may run in ``cfg.output_dir`` (see the module docstring) -> the overridden settings,
    {name: [the run's value, this leg's value]}. SystemExit with a sentence otherwise."""
    out = cfg.output_dir
    named = {n.strip().replace("-", "_") for n in cfg.override.split(",") if n.strip()}
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(named - fields)
    if unknown:
        raise SystemExit(f"--override: no setting named {', '.join(unknown)}")
    if named and not cfg.resume:
        raise SystemExit("--override names settings a resumed run may change: use it with --resume")
    if not cfg.resume:
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if found:
            raise SystemExit(f"{out} already holds a training run ({', '.join(found)}): continue it with --resume, "
                             "or give a new --output-dir (a folder holds one run)")
        return {}
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"--resume: {path} is damaged, so this run's settings cannot be compared with the "
                         "run's") from None
    now = {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}
    changed = {k: [recorded[k], now[k]] for k in sorted(now) if k in recorded and k not in FREE
               and recorded[k] != now[k]}
    refused = {k: v for k, v in changed.items() if k not in named}
    if refused:
        what = "; ".join(f"--{k.replace('_', '-')} {json.dumps(new)} (the run: {json.dumps(old)})"
                         for k, (old, new) in refused.items())
        raise SystemExit(f"--resume: settings differ from the run's ({path}): {what}. Resume with the run's "
                         f"settings, or name the deliberate changes: --override {','.join(refused)}")
    return changed


def _rows(path: str) -> list[str]:
    """The lines of a log.jsonl that parse (a killed run's torn last line is left out)."""
    lines = []
    with open(path) as f:
        for line in f:
            try:
                json.loads(line)
            except ValueError:
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
    return lines


def rewind_log(out: str, step: int, overrides: dict[str, list]) -> int:
    """Drop the rows of ``out/log.jsonl`` after ``step`` (replaced atomically), then add a row recording
    ``overrides``; returns how many rows were dropped."""
    path = os.path.join(out, "log.jsonl")
    dropped = 0
    if os.path.isfile(path):
        lines = _rows(path)
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        dropped = len(lines) - len(kept)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".log-")
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        apply_umask(tmp)
        os.replace(tmp, path)
    if overrides:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "kind": "override", "changed": overrides, "time": time.time()}) + "\n")
    return dropped
