"""The method language of ``python -m mfsr_fast.evaluation --methods``: what each table row runs.

``bicubic``; ``realesrgan`` (Real-ESRGAN x4plus alone); ``student:N`` (the MeanFlow student, N steps, on its own
sampler), optionally ``:refineT`` (another grid: the first jump to T, then N - 1 equal ones; with ``:above`` the N - 1
equal ones go from 1 down to T, then one jump to 0) and ``:endpoint`` or ``:average`` (the kind of jump), ``:detailD``
(the share D of its texture over R(LR) kept, ``upscale(detail=)``) and ``:flatD`` (that share where R(LR) is flat
only, the sampler's ``flat_detail``); ``teacher:N`` (N Euler steps) and ``teacher:N:cfgW`` (guidance w against the
negative prompt), optionally ``:refineT`` (the first step from t = 1 straight to T, then N - 1 equal steps),
``:aboveT`` (guidance only at the steps with t > T) and ``:flatD`` (its samples composed with R(LR) where that is
flat); ``NAME:N[...]`` as ``student:N`` for another student given as ``--student NAME=FOLDER``.
"""

from __future__ import annotations

from mfsr_fast.sampling.config import SamplerConfig, TeacherSampling, check_share
from mfsr_fast.sampling.meanflow import JUMPS, REFINE_SIDES

_TEACHER_OPTIONS = {"cfg": "guidance", "refine": "refine_t", "above": "above", "flat": "flat_detail"}
METHODS_HELP = ("bicubic, realesrgan, student:N[:refineT][:endpoint|:average][:below|:above][:detailD][:flatD], "
                "teacher:N[:cfgW][:refineT][:aboveT][:flatD], NAME:N[...] as student for a --student NAME=FOLDER, e.g. "
                "student:2:refine0.25:endpoint, student:4:refine0.7:endpoint:above, student:1:detail0.5, "
                "student:1:flat0.25, teacher:40:cfg1.5 or teacher:40:cfg1.5:refine0.5:above0.5")
RESERVED = ("bicubic", "realesrgan", "student", "teacher")  # method kinds: not names of --student


def parse_sampling(parts: list[str], flat: bool = True) -> TeacherSampling:
    """The teacher options ['cfgW', 'refineT', 'aboveT', 'flatD'] (any of them, each once) -> a ``TeacherSampling``;
    ValueError otherwise. ``flat=False``: 'flatD' refused too (for samplers in the flow's space, where there is no
    decoded output to compose with R(LR): ``training.trajectories``, ``training.diagnose``)."""
    opts = {}
    for part in parts:
        name = next((k for k in _TEACHER_OPTIONS if part.startswith(k)), None)
        if name is None or _TEACHER_OPTIONS[name] in opts or (name == "flat" and not flat):
            raise ValueError(part)
        opts[_TEACHER_OPTIONS[name]] = float(part[len(name):])
    above = opts.pop("above", 0.0)
    return TeacherSampling(**opts, interval=(above, 1.0))


def parse_student(parts: list[str]) -> dict:
    """The student options ['refineT', 'endpoint' | 'average', 'below' | 'above', 'detailD', 'flatD'] (any of them,
    each once) -> {"detail": D} and the ``SamplerConfig`` fields they set (the others stay the model's own);
    ValueError otherwise."""
    opts = {}
    for part in parts:
        if part.startswith("refine") and "refine_t" not in opts:
            opts["refine_t"] = float(part[len("refine"):])
        elif part.startswith("detail") and "detail" not in opts:
            opts["detail"] = float(part[len("detail"):])
        elif part.startswith("flat") and "flat_detail" not in opts:
            opts["flat_detail"] = float(part[len("flat"):])
        elif part in JUMPS and "jump" not in opts:
            opts["jump"] = part
        elif part in REFINE_SIDES and "refine_side" not in opts:
            opts["refine_side"] = part
        else:
            raise ValueError(part)
    check_share("detail", opts.get("detail", 1.0))  # the values' ranges
    SamplerConfig(**{k: v for k, v in opts.items() if k != "detail"})
    return opts


def parse_method(method: str, names=()) -> tuple[str, int, TeacherSampling | dict | None]:
    """'bicubic' | 'realesrgan' | 'student:N[:refineT][:jump][:side][:detailD][:flatD]'
    | 'teacher:N[:cfgW][:refineT][:aboveT][:flatD]' | 'NAME:N[...]' for a NAME in ``names`` (another student)
    -> (kind, steps, how): for a teacher the ``TeacherSampling``, for a student the options that replace its own
    (``parse_student``), None for the others; SystemExit otherwise."""
    kind, *rest = method.split(":")
    try:
        if kind in ("bicubic", "realesrgan") and not rest:
            return kind, 0 if kind == "bicubic" else 1, None
        if kind == "student" or kind in names:
            steps = int(rest[0]) if rest else 1
            if steps >= 1:
                return kind, steps, parse_student(rest[1:])
        if kind == "teacher":
            steps = int(rest[0]) if rest else 1
            if steps >= 1:
                return kind, steps, parse_sampling(rest[1:])
    except ValueError:
        pass
    raise SystemExit(f"unknown method {method!r} ({METHODS_HELP})")
