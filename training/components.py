"""The models a training command works with, with mistakes as one-line command-line errors: the teacher (through the
one teacher loader, ``pipeline.loading.load_teacher``), the codec, and the frozen students a distillation starts
from (``--init``) or blends its stored targets with (``--trajectory-anchor``); ``weights_digest`` says which weights
a run used, whatever their path."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import torch

from mfsr_fast.models.codec import make_codec
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.pipeline.loading import load_teacher, model_folder
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import SamplerConfig, load_sampler

# What makes two models' flows the same space: an anchor must agree with the student on all of these.
FLOW_FIELDS = ("codec", "in_channels", "prediction", "lr_stream", "lr_source", "residual_scale", "restorer")
ANCHOR_TEACHER = "teacher"  # --trajectory-anchor's name for the --teacher's own one step


def codec_for(model: MFSRTransformer, vae: str = ""):
    """``models.codec.make_codec`` for the training commands: the pixel codec, or the SD3 VAE from ``--vae`` (a
    diffusers AutoencoderKL folder) for "sd3-vae" models; mistakes as command-line errors."""
    if model.cfg.codec == "pixel4" and vae:
        raise SystemExit("--vae is for models in SD3 VAE latent space; this model uses the pixel codec")
    if model.cfg.codec != "pixel4" and not vae:
        raise SystemExit(f"this model works in SD3 VAE latents (codec {model.cfg.codec!r}): pass --vae, the VAE "
                         "folder (e.g. stable-diffusion-3.5-medium/vae)")
    try:
        return make_codec(model.cfg, vae or None)
    except ValueError as e:
        raise SystemExit(f"--vae: {e}") from None


def resolve_teacher(path: str, use_ema: bool = True, prompts: str = "", norm_k_bug: str = "auto",
                    lr_conv_scale: float = 0.0) -> tuple[MFSRTransformer, str]:
    """``--teacher``: a run folder, a checkpoint folder, a save_pretrained folder or a DiT4SR / SD3.5 folder, with the
    prompt embeddings of ``prompts`` (a prompt file) stored frozen in it -> (teacher, the folder it was read from)."""
    if not path:
        raise SystemExit("--teacher is required: a teacher run folder (python -m training.teacher --output-dir ...), "
                         "one of its checkpoints, a save_pretrained MFSRTransformer folder, or a DiT4SR-format "
                         "transformer folder")
    if not os.path.isdir(path):
        raise SystemExit(f"--teacher {path}: no such folder")
    if norm_k_bug not in ("auto", "on", "off"):
        raise SystemExit(f"--norm-k-bug must be auto, on or off, got {norm_k_bug!r}")
    try:
        teacher, report, folder = load_teacher(path, ema=use_ema, prompts=prompts or None,
                                               norm_k_bug={"auto": None, "on": True, "off": False}[norm_k_bug],
                                               lr_conv_scale=lr_conv_scale or None)
    except ValueError as e:
        raise SystemExit(f"--teacher: {e}") from None
    if report.format == "mfsr" and (norm_k_bug != "auto" or lr_conv_scale):
        raise SystemExit("--norm-k-bug / --lr-conv-scale apply to DiT4SR / SD3.5 folders; this teacher is an "
                         "MFSRTransformer that already records both in its config")
    if report.format != "mfsr":
        print(report, flush=True)
    return teacher, folder


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes, values): which teacher a folder's samples came from, whatever
    its path. Taken in fp32, as the builder samples."""
    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
        v = v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def differences(model: MFSRTransformer, ref: MFSRTransformer, fields, whose: str) -> str:
    """The config fields in which ``model`` differs from ``ref``, for an error message ("" where none)."""
    return ", ".join(f"{f} {getattr(model.cfg, f)!r} against {whose}{getattr(ref.cfg, f)!r}" for f in fields
                     if getattr(model.cfg, f) != getattr(ref.cfg, f))


def load_student(spec: str, flag: str, device="cpu") -> MFSRPipeline:
    """A frozen student in float32 (a run, a checkpoint, a save_pretrained folder or 'default'), for ``flag``."""
    try:
        return MFSRPipeline.from_pretrained(spec, device=device, dtype=torch.float32)
    except ValueError as e:
        raise SystemExit(f"{flag}: {e}") from None


def load_anchor(spec: str, student: MFSRTransformer, device, teacher: MFSRTransformer) -> MFSRTransformer:
    """``--trajectory-anchor``: a frozen student in the student's flow space, or (``ANCHOR_TEACHER``) the teacher
    itself (the student's flow by construction)."""
    if spec == ANCHOR_TEACHER:
        return teacher
    anchor = load_student(spec, "--trajectory-anchor", device).transformer
    differ = differences(anchor, student, FLOW_FIELDS, "")
    if differ:
        raise SystemExit(f"--trajectory-anchor {spec}: its flow is not the student's ({differ})")
    return anchor


def load_init(spec: str, student: MFSRTransformer) -> tuple[str, SamplerConfig]:
    """``--init``: the student's weights replaced by an existing student's, in place, after checking that it is the
    teacher's architecture and flow -> (its weights' digest, its sampler)."""
    init = load_student(spec, "--init")
    fields = [f.name for f in dataclasses.fields(student.cfg)]
    differ = differences(init.transformer, student, fields, "the teacher's ")
    if differ:
        raise SystemExit(f"--init {spec}: not the teacher's architecture and flow ({differ})")
    student.load_state_dict(init.transformer.state_dict())
    return weights_digest(init.transformer), init.sampler


def teacher_sampler(folder: str) -> SamplerConfig:
    """The sampler a student starts with: the one its teacher's folder holds (older folders kept one in
    config.json), the defaults for a teacher folder without one; a teacher's ``TeacherSampling`` is not a student's."""
    sampler = load_sampler(folder) if os.path.isdir(folder) else SamplerConfig()
    if not isinstance(sampler, SamplerConfig):
        print(f"--teacher {folder}: its sampler is a teacher's; the student starts with the defaults", file=sys.stderr)
        return SamplerConfig()
    return sampler


def default_folder(spec: str) -> str:
    """The folder 'default' or a run names (``pipeline.loading.model_folder``), for provenance records."""
    return model_folder(spec)
