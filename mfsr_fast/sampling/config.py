"""How a model is sampled, kept apart from what it is, the way a diffusers scheduler keeps its own config: a
pipeline's sampler is a ``SamplerConfig`` (a MeanFlow student's jumps) or a ``TeacherSampling`` (a flow-matching
teacher's guided Euler steps), stored as ``sampler_config.json`` beside the model's ``config.json``.

Every sampling knob is checked here and only here (``__post_init__``), wherever it is set: the library, the command
line's ``--sampler FILE.json``, an export, a training run.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os

import torch

from mfsr_fast.models.transformer import LEGACY_SAMPLER_KEYS
from mfsr_fast.sampling.meanflow import JUMPS, REFINE_SIDES, check_choice, check_refine_t, time_grid

SAMPLER_FILE = "sampler_config.json"


def check_share(name: str, value) -> None:
    """ValueError unless ``value`` is a real number in [0, 1] (not a bool): ``detail`` and ``flat_detail``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How a MeanFlow student takes its N steps, and how much of its texture over R(LR) stays where R(LR) is flat.

    - ``refine_t``, ``refine_side``: the time grid (``meanflow.time_grid``): 0 is uniform; with ``refine_t`` in
      (0, 1) "below" takes a first jump from t = 1 to ``refine_t`` and N - 1 equal steps from there to 0, "above" N - 1
      equal steps from 1 down to ``refine_t`` and one jump from there to 0.
    - ``jump``: "average" (MeanFlow's z_r = z_t - (t - r) u(z_t, r, t)) or "endpoint" (z_r = z_t - (t - r)
      u(z_t, 0, t): every jump aims at the one-step estimate from where it starts). One step is the same whatever
      these three are.
    - ``flat_detail``: for a restorer-conditioned residual model, the share of its texture over R(LR) kept where R(LR)
      is flat (``pipeline.compose.flat_weight``, applied in pixels after decoding); 1: off.
    """

    refine_t: float = 0.0
    refine_side: str = "below"
    jump: str = "average"
    flat_detail: float = 1.0

    def __post_init__(self):
        check_refine_t(self.refine_t)
        check_choice("refine_side", self.refine_side, REFINE_SIDES)
        check_choice("jump", self.jump, JUMPS)
        check_share("flat_detail", self.flat_detail)

    def grid(self, steps: int, device=None) -> torch.Tensor:
        return time_grid(steps, refine_t=self.refine_t, refine_side=self.refine_side, device=device)


@dataclasses.dataclass(frozen=True)
class TeacherSampling:
    """How a teacher is sampled: Euler steps of v_against + w (v_positive - v_against) where t is in ``interval``
    (lo, hi], of v_positive elsewhere, on ``time_grid(steps, refine_t=refine_t)`` (a first step from t = 1 straight to
    ``refine_t``, then equal steps to 0). The guidance interval follows Kynkaanniemi et al. 2024, "Applying guidance
    in a limited interval improves sample and distribution quality in diffusion models". The defaults are the plain
    form: guidance at every step of a uniform grid. ``flat_detail`` composes the output with R(LR) where R(LR) is flat,
    as a student's (``SamplerConfig``), so that a teacher's samples and a student's steps compare as a user gets
    them; 1: off."""

    guidance: float = 1.0
    against: str = "negative"
    refine_t: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    flat_detail: float = 1.0

    def __post_init__(self):
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or g != g or g < 0:
            raise ValueError(f"guidance must be a number >= 0, got {g!r}")
        check_choice("against", self.against, ("negative", "null"))
        check_refine_t(self.refine_t)
        lo, hi = self.interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"the guidance interval (lo, hi] needs 0 <= lo < hi <= 1, got ({lo}, {hi}]")
        check_share("flat_detail", self.flat_detail)

    def weight(self, t: float) -> float:
        """w at a step that starts at time t (1.0 outside the interval). Grid times are float32: a t within 1e-6 of
        an end counts as that end, so 'above 0.3' means the same on every grid."""
        lo, hi = self.interval
        return float(self.guidance) if lo + 1e-6 < t <= hi + 1e-6 else 1.0

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``weight`` for each sample of a batch of times (the distillation target's per-sample w)."""
        lo, hi = self.interval
        inside = (t > lo + 1e-6) & (t <= hi + 1e-6)
        return torch.where(inside, torch.full_like(t, float(self.guidance)), torch.ones_like(t))

    def grid(self, steps: int, device=None) -> torch.Tensor:
        return time_grid(steps, refine_t=self.refine_t, device=device)

    def nfe(self, steps: int) -> int:
        """Network passes for ``steps`` Euler steps: two at a guided step, one elsewhere."""
        return sum(2 if self.weight(float(t)) != 1.0 else 1 for t in self.grid(steps)[:-1])


SAMPLERS = {cls.__name__: cls for cls in (SamplerConfig, TeacherSampling)}


def sampler_from_dict(values: dict, base: SamplerConfig | TeacherSampling | None = None):
    """A sampler from a JSON object: its ``_class_name`` (default: ``base``'s kind, else ``SamplerConfig``) and the
    fields it gives, the others ``base``'s (or the defaults). ValueError naming an unknown kind or field."""
    values = dict(values)
    kind = values.pop("_class_name", type(base).__name__ if base is not None else "SamplerConfig")
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; known: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in names and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{kind} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(names))}")
    if "interval" in values:
        values["interval"] = tuple(values["interval"])
    start = dataclasses.asdict(base) if isinstance(base, cls) else {}
    return cls(**{**start, **{k: v for k, v in values.items() if k in names}})


def save_sampler(sampler: SamplerConfig | TeacherSampling, folder: str) -> str:
    """``folder/sampler_config.json``: the sampler's kind and every field."""
    path = os.path.join(folder, SAMPLER_FILE)
    with open(path, "w") as f:
        json.dump({"_class_name": type(sampler).__name__, **dataclasses.asdict(sampler)}, f, indent=2)
        f.write("\n")
    return path


def read_sampler_file(path: str, base: SamplerConfig | TeacherSampling | None = None):
    """A sampler from a JSON file (``sampler_from_dict`` over ``base``); ValueError naming the file and the fault."""
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as e:
        raise ValueError(f"sampler file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"sampler file {path}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"sampler file {path}: expected a JSON object of sampler fields")
    try:
        return sampler_from_dict(values, base)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampler file {path}: {e}") from None


def load_sampler(folder: str) -> SamplerConfig | TeacherSampling:
    """A model folder's sampler: its ``sampler_config.json``; in a folder written before that file existed, the sampler
    fields its config.json held; else the defaults."""
    path = os.path.join(folder, SAMPLER_FILE)
    if os.path.isfile(path):
        return read_sampler_file(path)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        config = {}
    return SamplerConfig(**{k: v for k, v in config.items() if k in LEGACY_SAMPLER_KEYS})
