"""The teacher's sampler: guided velocity, the time grid with a first jump, the guidance interval."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_model

from mfsr_fast.models.transformer import PROMPT_NAMES
from mfsr_fast.pipeline.pipeline import MFSRPipeline
from mfsr_fast.sampling.config import TeacherSampling
from mfsr_fast.sampling.guidance import guided_velocity, sample_teacher


def _teacher():
    return micro_model(torch.float64, learned_prompts=4, prediction="x").eval()


def _inputs(model, B=2, H=8, W=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, model.lr_channels, H, W, generator=g, dtype=torch.float64)
    e = torch.randn(B, model.cfg.in_channels, H, W, generator=g, dtype=torch.float64)
    return c, e


def _field(model, z, c, t, prompt):
    ctx, pooled = model.prompt(prompt, z.shape[0])
    return model.field(z, c, t, t, ctx, pooled)


def _count_passes(monkeypatch, model) -> list[int]:
    """The batch size of each pass the model makes from now on (2B: a guided pass, B: an unguided one)."""
    seen = []
    real = type(model).field

    def spy(self, zz, *args, **kw):
        seen.append(zz.shape[0])
        return real(self, zz, *args, **kw)

    monkeypatch.setattr(type(model), "field", spy)
    return seen


def test_guided_velocity_is_the_cfg_combination_of_two_prompts():
    model = _teacher()
    c, z = _inputs(model)
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    pos, neg, null = (_field(model, z, c, t, p) for p in PROMPT_NAMES)
    torch.testing.assert_close(guided_velocity(model, z, c, t, 1.0), pos, rtol=0, atol=0)
    torch.testing.assert_close(guided_velocity(model, z, c, t, 2.5), neg + 2.5 * (pos - neg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(guided_velocity(model, z, c, t, 2.5, "null"), null + 2.5 * (pos - null), rtol=1e-12,
                               atol=1e-12)


def test_sampler_follows_its_grid_and_guides_only_inside_the_interval(monkeypatch):
    """Against a loop written out here: the grid 1 -> refine_t -> equal steps -> 0, w where lo < t <= hi and the
    positive velocity alone elsewhere (one pass: the batch the model sees says which)."""
    model = _teacher()
    c, e = _inputs(model)
    how = TeacherSampling(guidance=3.0, refine_t=0.6, interval=(0.3, 1.0))
    steps = 5
    grid = [1.0, 0.6, 0.45, 0.3, 0.15, 0.0]
    torch.testing.assert_close(how.grid(steps), torch.tensor(grid))
    z = e
    g32 = how.grid(steps)  # the float32 grid the sampler steps on
    for i in range(steps):
        t, a = g32[i].expand(2), float(g32[i])
        pos, neg = _field(model, z, c, t, "positive"), _field(model, z, c, t, "negative")
        v = neg + 3.0 * (pos - neg) if a > 0.3 + 1e-6 else pos
        z = z - (g32[i] - g32[i + 1]) * v
    seen = _count_passes(monkeypatch, model)
    out = sample_teacher(model, c, e, steps=steps, guidance=how)
    torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10)
    # t = 1, 0.6, 0.45 are guided (batch 2B), t = 0.3 (the interval is open below) and 0.15 are not.
    assert seen == [4, 4, 4, 2, 2] and how.nfe(steps) == sum(s // 2 for s in seen) == 8


def test_a_plain_weight_is_the_uniform_grid_guided_everywhere():
    model = _teacher()
    c, e = _inputs(model)
    a = sample_teacher(model, c, e, steps=3, guidance=2.0)
    b = sample_teacher(model, c, e, steps=3, guidance=TeacherSampling(guidance=2.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    z, g32 = e, torch.linspace(1.0, 0.0, 4)
    for i in range(3):
        z = z - (g32[i] - g32[i + 1]) * guided_velocity(model, z, c, g32[i].expand(2), 2.0)
    torch.testing.assert_close(a, z, rtol=0, atol=0)
    assert TeacherSampling(guidance=2.0).nfe(3) == 6 and TeacherSampling().nfe(3) == 3


@pytest.mark.parametrize("bad, match", [
    (dict(guidance=-1.0), "guidance must be"), (dict(guidance=float("nan")), "guidance must be"),
    (dict(against="blurry"), "against must be"), (dict(refine_t=1.0), r"refine_t must be in \[0, 1\)"),
    (dict(interval=(0.5, 0.5)), "guidance interval"), (dict(interval=(-0.1, 1.0)), "guidance interval"),
])
def test_bad_sampling_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TeacherSampling(**bad)


def test_a_pipeline_samples_a_teacher_as_its_sampler_says_and_refuses_anything_else():
    how = TeacherSampling(guidance=1.5, refine_t=0.5, interval=(0.5, 1.0))
    model = micro_model(learned_prompts=4, prediction="x", in_channels=48, codec="pixel4", lr_source="bicubic").eval()
    pipe = MFSRPipeline(model, sampler=how)
    x = torch.rand(1, 3, 8, 8)
    out = pipe.upscale_rgb(x, steps=3)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    plain = pipe.with_sampler(TeacherSampling(guidance=1.5))
    assert not torch.equal(out, plain.upscale_rgb(x, steps=3)) and pipe.sampler is how
    with pytest.raises(TypeError, match="sampler must be a SamplerConfig or a TeacherSampling"):
        pipe.sampler = 1.5
    with pytest.raises(ValueError, match="use detail 1"):
        pipe.upscale_rgb(x, steps=3, detail=0.5)


def test_per_sample_weights_guide_inside_the_interval_only(monkeypatch):
    """The distillation target's form: one w per sample from ``TeacherSampling.weights`` (the rule of ``weight``,
    ends included); samples outside the interval get the positive velocity and no negative pass (one pass of B + G
    rows for G guided samples), an all-ones batch one pass of B, an all-guided one of 2B."""
    how = TeacherSampling(guidance=2.5, interval=(0.5, 1.0))
    grid = how.grid(8)
    assert how.weights(grid).tolist() == [how.weight(float(t)) for t in grid]
    assert how.weights(torch.tensor([1.0, 0.5, 0.5000001, 0.75, 0.0])).tolist() == [2.5, 1.0, 1.0, 2.5, 1.0]
    model = _teacher()
    c, z = _inputs(model)
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    w = how.weights(t)
    pos, neg = (_field(model, z, c, t, p) for p in ("positive", "negative"))
    seen = _count_passes(monkeypatch, model)
    v = guided_velocity(model, z, c, t, w)
    assert seen == [3]
    torch.testing.assert_close(v[0], (neg + 2.5 * (pos - neg))[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v[1], pos[1], rtol=1e-12, atol=1e-12)  # a batch of B + G, rounded as such
    t_late = torch.tensor([0.3, 0.7], dtype=torch.float64)  # the guided sample second: rows put back in order
    v = guided_velocity(model, z, c, t_late, how.weights(t_late))
    pos_late, neg_late = (_field(model, z, c, t_late, p) for p in ("positive", "negative"))
    torch.testing.assert_close(v[0], pos_late[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v[1], (neg_late + 2.5 * (pos_late - neg_late))[1], rtol=1e-12, atol=1e-12)
    del seen[:]
    torch.testing.assert_close(guided_velocity(model, z, c, t, torch.ones(2)), pos, rtol=0, atol=0)
    w_all = torch.tensor([2.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(guided_velocity(model, z, c, t, w_all), neg + w_all.view(2, 1, 1, 1) * (pos - neg),
                               rtol=1e-12, atol=1e-12)
    assert seen == [2, 4]
    with pytest.raises(ValueError, match=r"per-sample guidance weights need shape \(2,\)"):
        guided_velocity(model, z, c, t, torch.ones(3))


def test_distillation_target_is_guided_above_its_threshold_only(monkeypatch):
    """training.distill with guidance_above: the teacher velocity each sample's target uses is guided exactly where
    its t is above the threshold (the field the teacher's sampler teacher:N:cfgW:refineT:aboveT integrates)."""
    import training.distill_loss as distill_loss
    from training.components import codec_for
    from training.distill import DistillConfig

    teacher = micro_model(learned_prompts=4, prediction="x", in_channels=48, codec="pixel4", lr_source="bicubic").eval()
    student = micro_model(learned_prompts=4, prediction="x", in_channels=48, codec="pixel4", lr_source="bicubic")
    cfg = DistillConfig(guidance=1.5, guidance_above=0.5, t_mean=0.0, t_one_fraction=0.3)
    calls = []
    real = distill_loss.guided_velocity
    monkeypatch.setattr(distill_loss, "guided_velocity", lambda m, z, c, t, w, against: calls.append((t, w)) or
                        real(m, z, c, t, w, against))
    loss_fn = distill_loss.make_loss(cfg, teacher, codec_for(student))
    B = 12
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(B, 3, 32, 32, generator=g), torch.rand(B, 3, 8, 8, generator=g), None, list(range(B)))
    loss, parts = loss_fn(student, student, batch, 0, None)
    assert torch.isfinite(loss) and set(parts) == {"mse"} and parts["mse"] > 0
    (t, w), = calls
    assert ((t > 0.5) & (t < 1)).any() and (t == 1).any() and (t <= 0.5).any()  # the draw covers every case
    torch.testing.assert_close(w, torch.where(t > 0.5, 1.5, 1.0), rtol=0, atol=0)
