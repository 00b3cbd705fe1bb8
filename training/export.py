"""Export a trained student as a self-contained model folder: ``python -m training.export RUN_DIR OUT_DIR``.

Takes the EMA weights of the run's newest checkpoint (or of the checkpoint folder given) and the run's sampler, writes
them with ``MFSRPipeline.save_pretrained`` (config.json + safetensors, the learned prompts inside; sampler_config.json,
with ``--refine-t`` / ``--jump`` / ``--refine-side`` / ``--flat-detail`` over the run's) and an ``info.json`` with where
they came from: the student run, its teacher, steps, wall time from the JSONL logs, and the machine. A student in SD3
VAE latent space gets its VAE copied to ``OUT_DIR/vae`` (from ``--vae``, or the run's own ``vae`` setting), so that
``upscale(..., model=OUT_DIR)`` finds everything in one folder. A ``manifest.json`` lists every file with its SHA-256,
and loading checks it. OUT_DIR is never inside the run; a folder that already holds files is only written with
``--overwrite``, and then only this export's own files in it are replaced (``mfsr_fast.io.folders``). From a checkpoint,
what the run recorded beside the weights (its step, the teacher, the stored samples' provenance and digests, the anchor
and init students) goes into ``info.json`` as ``student_run``. A restorer-conditioned student (DESIGN section 8) gets
its restorer copied to ``OUT_DIR/restorer`` the same way; ``--no-restorer`` leaves it out, so the folder names the
restorer (its config's ``restorer``) and finds it where the set-up installs it (the embedded default does this, so that
the repository holds no restorer weights; ``make setup`` converts them from their released source).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile

import torch

from mfsr_fast.io.folders import FolderError, check_destination, install
from mfsr_fast.io.integrity import MANIFEST, apply_umask, write_manifest
from mfsr_fast.models.codec import make_codec
from mfsr_fast.models.convert import load_mfsr
from mfsr_fast.pipeline.loading import DEFAULT_MODEL, find_weights
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import load_sampler
from mfsr_fast.sampling.meanflow import JUMPS, REFINE_SIDES
from training.components import weights_digest


def _log_summary(run_dir: str, upto: int | None = None) -> dict:
    """A run's log.jsonl in brief: steps, training seconds (from the logged rates), the last logged loss. ``upto``: the
    step of the checkpoint exported, which counts as the steps; rows after it (a run that went on) are left out, and
    ``logged_to`` says where the log stops short of it (a run stopped by --max-minutes between two log lines). Steps a
    resumed run redid count once."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return {}
    rows = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:  # a killed run's torn last line
            continue
        if r.get("kind") is not None or "steps_per_s" not in r:  # validation rows, a resumed run's overrides
            continue
        while rows and rows[-1]["step"] >= r["step"]:  # a resume redid these steps (logs before rewind_log)
            rows.pop()
        rows.append(r)
    if upto is not None:
        rows = [r for r in rows if r["step"] <= upto]
    if not rows:
        return {"steps": upto} if upto is not None else {}
    steps = rows[-1]["step"] if upto is None else upto
    short = {"logged_to": rows[-1]["step"]} if rows[-1]["step"] != steps else {}
    prev, wall = 0, 0.0
    for r in rows:  # each row's rate covers the steps since the previous row
        wall += (r["step"] - prev) / max(r["steps_per_s"], 1e-9)
        prev = r["step"]
    return {"steps": steps, **short, "train_seconds": round(wall, 1), "final_loss": rows[-1]["loss"],
            **{f"final_{k}": v for k, v in rows[-1].items() if k.startswith("mse")}}  # distill's raw errors


def _run_record(run: str, src: str) -> dict:
    """What a student run left about itself: its log's summary (``student``), what it recorded beside the weights
    ``src`` (``student_run``: teacher, stored samples, anchor, init) and its settings (``student_config``)."""
    rec, step = {}, None
    state = os.path.join(os.path.dirname(src), "trainer_state.json")  # src: a checkpoint's ema/ or model/ folder
    if os.path.isfile(state):
        recorded = json.load(open(state))
        step = recorded.get("step")
        rec["student_run"] = {"step": step, **recorded.get("extra", {})}
    rec = {"student": _log_summary(run, step if isinstance(step, int) else None), **rec}
    cfg_path = os.path.join(run, "config.json")
    if os.path.isfile(cfg_path):
        cfg = json.load(open(cfg_path))
        if "max_steps" in cfg:  # a run's settings, not a model folder's architecture
            rec["student_config"] = cfg
    return rec


INIT_DEPTH = 4  # how many --init generations an export records


def _init_record(init: str, depth: int = INIT_DEPTH, digest: str = "") -> dict:
    """The provenance of the student an ``--init`` run started from, so that a fine-tuned model's info.json holds its
    whole recipe: an exported folder's (or the embedded default's) own info.json, or a run's record with its own
    init nested in turn; {} where the folder is gone (the path alone stays in ``student_config``) or, given the run's
    ``init_weights`` ``digest``, no longer holds the weights the run started from (a notice says so)."""
    if not init or depth == 0:
        return {}
    name = init
    if init == "default":
        init = DEFAULT_MODEL
    if not os.path.isdir(init):
        return {}
    if digest:
        try:  # read afresh (not through load_model's cache of what a path held earlier)
            now = weights_digest(load_mfsr(find_weights(init), torch.float32))
        except (ValueError, OSError):
            return {}
        if now != digest:
            print(f"export: --init {name} no longer holds the weights the run started from (digest {now[:12]}..., "
                  f"the run's {digest[:12]}...): its record is left out", file=sys.stderr)
            return {}
    if os.path.isfile(os.path.join(init, "info.json")):
        return json.load(open(os.path.join(init, "info.json")))
    try:
        src = find_weights(init)
    except (ValueError, OSError):
        return {}
    rec = {"source": os.path.abspath(src), **_run_record(init, src)}
    nested = _init_record(rec.get("student_config", {}).get("init", ""), depth - 1,
                          rec.get("student_run", {}).get("init_weights", ""))
    if nested:
        rec["init"] = nested
    return rec


def _portable(value):
    """Paths under the working folder become relative ones, so info.json does not record the exporting machine's
    layout; other values pass through (recursively for dicts)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(os.path.normpath(value), os.getcwd())
        return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else value
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="student run folder (or checkpoint / save_pretrained folder)")
    ap.add_argument("output", help="folder to write: new or empty, or with --overwrite one whose files of an "
                    "earlier export are replaced (nothing else in it is touched); never inside the run")
    ap.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files, "
                    "replacing only this export's own (config, weights, sampler, info, manifest, vae/, restorer/)")
    ap.add_argument("--vae", help="the VAE folder of an SD3-VAE student (default: the run's --vae)")
    ap.add_argument("--no-restorer", action="store_true", help="do not copy a restorer-conditioned student's "
                    "restorer into the folder (it is then found by name, where the set-up installs it)")
    ap.add_argument("--refine-t", type=float, default=None, help="the sampler's grid: the turning point of its "
                    "multi-step grid (SamplerConfig.refine_t; 0: uniform); default: keep the run's")
    ap.add_argument("--jump", choices=JUMPS, default=None, help="the sampler's kind of multi-step jump "
                    "(SamplerConfig.jump: 'average' is MeanFlow's u(z, r, t), 'endpoint' asks u(z, 0, t) at every "
                    "jump); default: keep the run's")
    ap.add_argument("--refine-side", choices=REFINE_SIDES, default=None, help="where the grid's equal steps go "
                    "(SamplerConfig.refine_side: 'below' refine_t after a first jump to it, 'above' it from 1 down to "
                    "refine_t, then one jump to 0); default: keep the run's")
    ap.add_argument("--flat-detail", type=float, default=None, help="the sampler's share of the model's texture over "
                    "R(LR) kept where R(LR) is flat (SamplerConfig.flat_detail; 1: off; restorer-conditioned "
                    "students only); default: keep the run's")
    return ap


def _pipeline(args, src: str, vae: str) -> MFSRPipeline:
    """The run's weights (float32) with its sampler, the export's --refine-t / --jump / --refine-side /
    --flat-detail over it, its codec and its restorer; mistakes as one line naming the flag."""
    try:
        model = load_mfsr(src, torch.float32)
    except ValueError as e:
        raise SystemExit(f"export: {e}") from None
    if model.cfg.codec == "sd3-vae" and not vae:
        raise SystemExit("this student works in SD3 VAE latents: pass --vae, the VAE folder it was trained with")
    overrides = {k: v for k, v in (("refine_t", args.refine_t), ("jump", args.jump),
                                   ("refine_side", args.refine_side), ("flat_detail", args.flat_detail))
                 if v is not None}
    try:
        codec = make_codec(model.cfg, vae or None)
    except ValueError as e:
        raise SystemExit(f"--vae: {e}") from None
    try:
        pipe = MFSRPipeline(model, codec)
    except ValueError as e:  # the restorer it names is not installed
        raise SystemExit(str(e)) from None
    try:
        pipe.sampler = dataclasses.replace(load_sampler(src), **overrides)
    except ValueError as e:
        raise SystemExit(f"{', '.join('--' + k.replace('_', '-') for k in overrides)}: {e}") from None
    return pipe


def _info(run: str, src: str) -> dict:
    """info.json: the source, the run's record, its --init student's, its teacher's, the machine."""
    info = {"source": os.path.abspath(src), **_run_record(run, src),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"}
    init = _init_record(info.get("student_config", {}).get("init", ""), INIT_DEPTH,
                        info.get("student_run", {}).get("init_weights", ""))
    if init:
        info["init"] = init
    teacher = info.get("student_config", {}).get("teacher")
    if teacher and os.path.isdir(teacher):
        info["teacher"] = _log_summary(teacher)
        tcfg = os.path.join(teacher, "config.json")
        if os.path.isfile(tcfg):
            info["teacher_config"] = json.load(open(tcfg))
    return info


WRITTEN_BY = "python -m training.export"


def _write(pipe: MFSRPipeline, info: dict, out: str, restorer: bool) -> int:
    """The folder, staged beside ``out`` and installed when whole, with a manifest of every file (which loading
    checks); nothing is left behind when writing fails. Returns the bytes written."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        pipe.save_pretrained(tmp, restorer=restorer)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(_portable(dict(info, manifest=MANIFEST)), f, indent=2)
        files = write_manifest(tmp, written_by=WRITTEN_BY)["files"]
        apply_umask(tmp)
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(f["size"] for f in files.values())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # before any work: never write into the run, a file, or a folder of someone else's files
        check_destination(args.output, inputs=(args.run, args.vae or ""), overwrite=args.overwrite)
        src = find_weights(args.run)
    except (FolderError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    info = _info(args.run, src)
    pipe = _pipeline(args, src, args.vae or info.get("student_config", {}).get("vae", ""))
    if pipe.restorer is not None:
        rinfo = os.path.join(pipe.restorer.path, "info.json")
        info["restorer"] = json.load(open(rinfo)) if os.path.isfile(rinfo) else {"name": pipe.transformer.cfg.restorer}
        info["restorer"]["carried"] = not args.no_restorer
    try:
        size = _write(pipe, info, args.output, not args.no_restorer)
    except FolderError as e:
        raise SystemExit(f"export: {e}") from None
    print(f"exported {src} -> {args.output} ({size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
