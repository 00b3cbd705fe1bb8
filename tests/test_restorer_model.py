"""Restorer-conditioned models (DESIGN section 8): the LR stream's source, the residual flow over R(LR), upscaling
with R, training from R on the device and from a precomputed pool, export with the restorer carried, and the
``realesrgan`` evaluation method. A 1-block random RRDBNet stands in for Real-ESRGAN x4plus."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import randomize_

from mfsr_fast import MFSRPipeline, SamplerConfig, TeacherSampling, upscale
from mfsr_fast.models.transformer import MFSRTransformer
from mfsr_fast.pipeline.tiling import RESTORED_DTYPE

MICRO = dict(num_layers=1, dual_attention_layers=(0,), num_heads=2, head_dim=16)


def _model(**kw) -> MFSRTransformer:
    torch.manual_seed(0)
    return MFSRTransformer.from_preset("tiny-r", **{**MICRO, **kw}).eval()


def _pipe(model: MFSRTransformer, sampler=None) -> MFSRPipeline:
    return MFSRPipeline(model, sampler=sampler)


def held(restored: torch.Tensor) -> torch.Tensor:
    """R(LR) rounded as the pipeline holds it."""
    return restored.to(RESTORED_DTYPE).float()


def test_fresh_residual_model_is_exactly_the_restorer(restorer_dir):
    """x = R(LR) + residual_scale * y with a zero-initialised output: every step count, whole or tiled, gives R(LR)
    (as the pipeline holds it, ``tiling.RESTORED_DTYPE``)."""
    pipe = _pipe(_model())
    x = torch.rand(1, 3, 20, 28)
    ref = held(pipe.restorer(x))
    teacher = pipe.with_sampler(TeacherSampling(guidance=2.0))
    for p, kw in ((pipe, dict(steps=1)), (pipe, dict(steps=3)), (pipe, dict(steps=2, tile=8, overlap=4)),
                  (teacher, dict(steps=2))):
        torch.testing.assert_close(p.upscale_rgb(x, **kw), ref, rtol=0, atol=2e-6)
    odd = x[:, :, :19, :27]  # padded to whole patches, R(LR) padded alike, then cropped back
    torch.testing.assert_close(pipe.upscale_rgb(odd, tile=8, overlap=4), held(pipe.restorer(odd)), rtol=0, atol=2e-6)


def test_restored_image_is_used_and_checked(restorer_dir):
    pipe = _pipe(_model())
    x = torch.rand(1, 3, 8, 8)
    given = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(pipe.upscale_rgb(x, restored=given), held(given), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="restored must be"):
        pipe.upscale_rgb(x, restored=torch.rand(1, 3, 16, 16))


def test_multi_step_sampling_follows_the_pipelines_sampler(restorer_dir, monkeypatch):
    """The pipeline runs a student on the grid and the jumps its sampler says (refine_t, refine_side, jump)."""
    from mfsr_fast.pipeline import pipeline as pl

    seen = []
    real = pl.sample

    def spy(fn, noise, *, steps=1, timesteps=None, callback=None, jump="average"):
        seen.append(([round(float(t), 6) for t in timesteps], jump))
        return real(fn, noise, steps=steps, timesteps=timesteps, callback=callback, jump=jump)

    monkeypatch.setattr(pl, "sample", spy)  # what each tile's sampling calls
    x = torch.rand(1, 3, 8, 8)
    _pipe(_model(), SamplerConfig(refine_t=0.06)).upscale_rgb(x, steps=4)
    _pipe(_model()).upscale_rgb(x, steps=2)
    end = _pipe(randomize_(_model()), SamplerConfig(refine_t=0.25, jump="endpoint"))
    a = end.upscale_rgb(x, steps=2)
    b = end.with_sampler(SamplerConfig(refine_t=0.25)).upscale_rgb(x, steps=2)
    c = end.with_sampler(SamplerConfig(refine_t=0.25, jump="endpoint")).upscale_rgb(x, steps=2)
    _pipe(_model(), SamplerConfig(refine_t=0.7, jump="endpoint", refine_side="above")).upscale_rgb(x, steps=4)
    assert seen == [([1.0, 0.06, 0.04, 0.02, 0.0], "average"), ([1.0, 0.5, 0.0], "average"),
                    ([1.0, 0.25, 0.0], "endpoint"), ([1.0, 0.25, 0.0], "average"), ([1.0, 0.25, 0.0], "endpoint"),
                    ([1.0, 0.9, 0.8, 0.7, 0.0], "endpoint")]
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert (a - b).abs().max() > 1e-4  # the model's output depends on r: the two kinds of jump differ
    with pytest.raises(TypeError, match="SamplerConfig"):
        end.sampler = {"jump": "endpoint"}
    with pytest.raises(ValueError, match="detail scales a student's output"):
        end.with_sampler(TeacherSampling()).upscale_rgb(x, steps=2, detail=0.5)
    with pytest.raises(ValueError, match="jump must be"):
        SamplerConfig(jump="midpoint")
    with pytest.raises(ValueError, match="refine_side must be"):
        SamplerConfig(refine_side="sideways")


def _cli_option(tmp_path, img: np.ndarray, args: list[str], bad_args: list[str], expected: np.ndarray) -> None:
    """The CLI with ``args`` on the model saved in tmp_path/m writes ``expected``; on tmp_path/plain (no base, no
    restorer) it stops before any image (exit 2); a value outside [0, 1] is a usage error, also before any image."""
    from PIL import Image

    from mfsr_fast.apps.cli import main as cli_main

    Image.fromarray(img).save(tmp_path / "a.png")
    cli = [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model"]
    assert cli_main([*cli, str(tmp_path / "m"), *args]) == 0
    with Image.open(tmp_path / "out" / "a_x4.png") as im:
        assert np.array_equal(np.asarray(im), expected)
    assert cli_main([*cli, str(tmp_path / "plain"), *args, "--suffix", "_p"]) == 2  # before any image
    assert not os.path.exists(tmp_path / "out" / "a_p.png")
    assert cli_main([*cli, str(tmp_path / "m"), *bad_args, "--suffix", "_b"]) == 2
    assert not os.path.exists(tmp_path / "out" / "a_b.png")


def _json(tmp_path, values: dict) -> str:
    path = tmp_path / f"sampler_{abs(hash(json.dumps(values, sort_keys=True)))}.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_detail_scales_what_the_model_adds_to_r(restorer_dir, tmp_path):
    """detail d: the output is R(LR) + d (model's output - R(LR)), at 1 and at 4 steps, through the pipeline,
    upscale, the evaluation's ``:detailD`` and the CLI's --detail; 1 is the model's own output, 0 R(LR). A model whose
    flow has no base refuses d < 1, and bad values are sentences before anything runs."""
    from mfsr_fast.evaluation.methods import parse_method

    pipe = _pipe(randomize_(_model()), SamplerConfig(refine_t=0.7, jump="endpoint", refine_side="above"))
    x = torch.rand(1, 3, 8, 12)
    r = held(pipe.restorer(x))
    for steps in (1, 4):
        own = pipe.upscale_rgb(x, steps=steps)
        torch.testing.assert_close(pipe.upscale_rgb(x, steps=steps, detail=1.0), own, rtol=0, atol=0)
        torch.testing.assert_close(pipe.upscale_rgb(x, steps=steps, detail=0.0), r, rtol=0, atol=2e-6)
        half = pipe.upscale_rgb(x, steps=steps, detail=0.5)
        inside = (own > 0) & (own < 1)  # where the model's own output was not clamped
        assert inside.float().mean() > 0.5 and (own - r).abs().max() > 0.05  # a model that adds something
        torch.testing.assert_close(half[inside], ((r + own) / 2)[inside], rtol=0, atol=2e-6)
    pipe.save_pretrained(str(tmp_path / "m"), restorer=False)
    img = (np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)
    full = upscale(img, model=str(tmp_path / "m"))
    half = upscale(img, model=str(tmp_path / "m"), detail=0.5)
    base = upscale(img, model=str(tmp_path / "m"), detail=0)
    inside = (full > 0) & (full < 255)  # not clamped
    assert inside.mean() > 0.5
    assert np.abs(half.astype(int) - (full.astype(int) + base.astype(int)) / 2)[inside].max() <= 1  # rounding
    assert not np.array_equal(half, full) and not np.array_equal(half, base)
    for bad in (1.5, -0.1, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="detail must be"):
            upscale(img, model=str(tmp_path / "m"), detail=bad)
    plain = MFSRTransformer.from_preset("tiny", **MICRO)  # bicubic LR stream, flow over x itself: no base
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no base"):
        upscale(img, model=str(tmp_path / "plain"), detail=0.5)
    assert parse_method("student:1:detail0.5") == ("student", 1, {"detail": 0.5})
    with pytest.raises(SystemExit, match="unknown method"):
        parse_method("student:1:detail2")
    _cli_option(tmp_path, img, ["--detail", "0.5"], ["--detail", "2"], half)


def test_flat_detail_takes_texture_off_where_r_is_flat(restorer_dir, tmp_path, monkeypatch):
    """The sampler's flat_detail f: the output is R(LR) + w (model's output - R(LR)) with w = compose.flat_weight(
    R(LR), f): f where R's local texture is low, 1 where it is high; 1 is the model's own output. Through the
    pipeline, upscale with a pipeline, the evaluation's ``:flatD`` and the CLI's --sampler; a model without a
    restorer refuses f < 1, and bad values are sentences before anything runs."""
    from mfsr_fast.evaluation.methods import parse_method
    from mfsr_fast.pipeline import compose
    from mfsr_fast.pipeline.compose import FLAT_TEXTURE, flat_weight
    from mfsr_fast.pipeline.texture import local_texture, luma

    # the weight: flat_detail on a flat half, 1 on a busy half (away from the seam), all 1 at f = 1
    img = torch.full((1, 3, 48, 96), 0.5)
    img[..., 48:] = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    w = flat_weight(img, 0.25)
    assert w.shape == (1, 1, 48, 96) and FLAT_TEXTURE[0] < FLAT_TEXTURE[1]
    torch.testing.assert_close(w[..., :30], torch.full_like(w[..., :30], 0.25))
    torch.testing.assert_close(w[..., 66:], torch.ones_like(w[..., 66:]))
    torch.testing.assert_close(flat_weight(img, 1.0), torch.ones_like(w))

    pipe = _pipe(randomize_(_model()))
    x = torch.rand(1, 3, 8, 12)
    x[..., :6] = 0.4  # a flat left half: R(x) is flat there
    r = held(pipe.restorer(x))
    # the small test restorer's texture is far below a photo's: thresholds at its own quantiles, so that this image
    # has both kinds of area
    t = local_texture(luma(r)).sqrt().flatten()
    monkeypatch.setattr(compose, "FLAT_TEXTURE", (float(t.quantile(0.3)), float(t.quantile(0.7))))
    own = pipe.upscale_rgb(x)
    same = pipe.with_sampler(SamplerConfig(flat_detail=1.0)).upscale_rgb(x)
    torch.testing.assert_close(same, own, rtol=0, atol=0)
    flat_pipe = pipe.with_sampler(SamplerConfig(flat_detail=0.25))
    flat = flat_pipe.upscale_rgb(x)
    wr = flat_weight(r, 0.25)
    assert wr.min() < 0.5 and wr.max() == 1  # both kinds of area in this image (one tile: the same map)
    torch.testing.assert_close(flat, (r + wr * (own - r)).clamp(0, 1), rtol=0, atol=2e-6)
    pipe.save_pretrained(str(tmp_path / "m"), restorer=False)
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = upscale(arr, model=flat_pipe)
    assert not np.array_equal(out, upscale(arr, model=str(tmp_path / "m")))
    for bad in (1.5, -0.1, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="flat_detail must be"):
            SamplerConfig(flat_detail=bad)
    plain = MFSRTransformer.from_preset("tiny", **MICRO)  # bicubic LR stream: no R to look at
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not a restorer-conditioned"):
        _pipe(plain).with_sampler(SamplerConfig(flat_detail=0.5))
    assert parse_method("student:1:flat0.25") == ("student", 1, {"flat_detail": 0.25})
    assert parse_method("student:2:detail0.5:flat0.5") == ("student", 2, {"detail": 0.5, "flat_detail": 0.5})
    with pytest.raises(SystemExit, match="unknown method"):
        parse_method("student:1:flat2")
    _cli_option(tmp_path, arr, ["--sampler", _json(tmp_path, {"flat_detail": 0.25})],
                ["--sampler", _json(tmp_path, {"flat_detail": 2})], out)


def test_a_folders_sampler_is_its_default_and_a_teacher_composes_alike(restorer_dir, tmp_path, monkeypatch):
    """A folder's sampler_config.json is its pipeline's sampler: what upscale gives for that folder, 1 gives the raw
    output, another value replaces it. A teacher's samples compose the same way (TeacherSampling.flat_detail, the
    evaluation's teacher:N:flatD). Sampling only: the weights and the raw output are the same model's."""
    from mfsr_fast.evaluation.methods import parse_method, parse_sampling
    from mfsr_fast.pipeline import compose
    from mfsr_fast.pipeline.compose import flat_weight
    from mfsr_fast.pipeline.texture import local_texture, luma

    raw_pipe = _pipe(randomize_(_model()))
    own_pipe = raw_pipe.with_sampler(SamplerConfig(flat_detail=0.25))
    x = torch.rand(1, 3, 8, 12)
    x[..., :6] = 0.4
    r = held(raw_pipe.restorer(x))
    t = local_texture(luma(r)).sqrt().flatten()
    monkeypatch.setattr(compose, "FLAT_TEXTURE", (float(t.quantile(0.3)), float(t.quantile(0.7))))
    raw = raw_pipe.upscale_rgb(x)
    wr = flat_weight(r, 0.25)
    assert wr.min() < 0.5 and wr.max() == 1
    torch.testing.assert_close(own_pipe.upscale_rgb(x), (r + wr * (raw - r)).clamp(0, 1), rtol=0, atol=2e-6)
    own_pipe.save_pretrained(str(tmp_path / "own"), restorer=False)
    assert json.load(open(tmp_path / "own" / "sampler_config.json"))["flat_detail"] == 0.25
    assert "flat_detail" not in json.load(open(tmp_path / "own" / "config.json"))  # the architecture only
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    raw_pipe.save_pretrained(str(tmp_path / "raw"), restorer=False)
    loaded = upscale(arr, model=str(tmp_path / "own"))
    # (weights read from files on both sides: where they lie in memory can move the last float bit)
    raw_loaded = MFSRPipeline.from_pretrained(str(tmp_path / "raw"))
    np.testing.assert_array_equal(loaded, upscale(arr, model=raw_loaded.with_sampler(SamplerConfig(flat_detail=0.25))))
    np.testing.assert_array_equal(upscale(arr, model=MFSRPipeline.from_pretrained(str(tmp_path / "own")).with_sampler(
        SamplerConfig())), upscale(arr, model=str(tmp_path / "raw")))
    assert not np.array_equal(loaded, upscale(arr, model=str(tmp_path / "raw")))
    # detail keeps the sampler's own flat_detail
    d = own_pipe.upscale_rgb(x, detail=0.5)
    rd = raw_pipe.upscale_rgb(x, detail=0.5)
    torch.testing.assert_close(d, (r + wr * (rd - r)).clamp(0, 1), rtol=0, atol=2e-6)
    # a teacher: its decoded samples composed with R(LR) alike
    how = TeacherSampling(guidance=1.5, refine_t=0.5)
    teacher_raw = raw_pipe.with_sampler(how).upscale_rgb(x, steps=2)
    teacher_flat = raw_pipe.with_sampler(dataclasses.replace(how, flat_detail=0.25)).upscale_rgb(x, steps=2)
    torch.testing.assert_close(teacher_flat, (r + wr * (teacher_raw - r)).clamp(0, 1), rtol=0, atol=2e-6)
    assert parse_method("teacher:40:cfg1.25:refine0.5:above0.5:flat0.25") == (
        "teacher", 40, TeacherSampling(guidance=1.25, refine_t=0.5, interval=(0.5, 1.0), flat_detail=0.25))
    with pytest.raises(ValueError, match="flat0.25"):  # flow-space samplers: nothing decoded to compose
        parse_sampling(["cfg1.5", "flat0.25"], flat=False)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="flat_detail must be"):
            TeacherSampling(flat_detail=bad)
    plain = MFSRTransformer.from_preset("tiny", **MICRO)
    with pytest.raises(ValueError, match="not a restorer-conditioned"):
        _pipe(plain, TeacherSampling(flat_detail=0.5))


def test_folders_written_before_sampler_config_still_load(restorer_dir, tmp_path):
    """A folder from before samplers had their own file holds the sampler in config.json (the shipped default and
    every exported run did): it loads with that sampler, the same images as the folder written now, and a copy of
    the shipped default in that form gives the shipped default's output."""
    from mfsr_fast.pipeline.loading import DEFAULT_MODEL

    sampler = SamplerConfig(refine_t=0.7, refine_side="above", jump="endpoint", flat_detail=0.5)
    pipe = _pipe(randomize_(_model()), sampler)
    pipe.save_pretrained(str(tmp_path / "new"), restorer=False)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    os.remove(tmp_path / "old" / "sampler_config.json")
    cfg = json.load(open(tmp_path / "old" / "config.json"))
    json.dump({**cfg, **dataclasses.asdict(sampler)}, open(tmp_path / "old" / "config.json", "w"))
    old = MFSRPipeline.from_pretrained(str(tmp_path / "old"))
    assert old.sampler == sampler and "refine_t" not in old.transformer.config  # not the architecture's
    img = (np.random.default_rng(2).random((8, 12, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(upscale(img, model=str(tmp_path / "old"), steps=3),
                                  upscale(img, model=str(tmp_path / "new"), steps=3))
    old.save_pretrained(str(tmp_path / "resaved"), restorer=False)  # written anew: the new form
    assert "refine_t" not in json.load(open(tmp_path / "resaved" / "config.json"))
    assert MFSRPipeline.from_pretrained(str(tmp_path / "resaved")).sampler == sampler
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        return
    shipped = MFSRPipeline.from_pretrained("default")
    shutil.copytree(DEFAULT_MODEL, tmp_path / "legacy_default")
    os.remove(tmp_path / "legacy_default" / "sampler_config.json")
    cfg = json.load(open(tmp_path / "legacy_default" / "config.json"))
    json.dump({**cfg, **dataclasses.asdict(shipped.sampler)}, open(tmp_path / "legacy_default" / "config.json", "w"))
    legacy = MFSRPipeline.from_pretrained(str(tmp_path / "legacy_default"))
    assert legacy.sampler == shipped.sampler and legacy.transformer.cfg == shipped.transformer.cfg
    np.testing.assert_array_equal(legacy(img, steps=2), shipped(img, steps=2))


def test_flow_space_round_trip_and_field_base():
    m = randomize_(_model(lr_source="both"))
    C = m.cfg.in_channels
    x, lr = torch.randn(2, C, 8, 8), torch.randn(2, 2 * C, 8, 8)
    y = m.to_flow(x, lr)
    torch.testing.assert_close(y, (x - lr[:, :C]) / m.cfg.residual_scale)
    torch.testing.assert_close(m.from_flow(y, lr), x)
    plain = randomize_(MFSRTransformer.from_preset("tiny", **MICRO))
    assert plain.to_flow(x, lr[:, :C]) is x and plain.from_flow(x, lr[:, :C]) is x
    # x_lr predictions add the first LR image (the base), also when a second one follows.
    xl = randomize_(MFSRTransformer.from_preset("tiny", **MICRO, lr_source="both", restorer="r"))
    z, t = torch.randn(2, C, 8, 8), torch.full((2,), 0.5)
    out = xl(z, lr, t, t, prompt="positive")
    torch.testing.assert_close(xl.field(z, lr, t, t, prompt="positive"), (z - (lr[:, :C] + out)) / 0.5)


def test_both_sources_extra_embedding_starts_at_zero():
    both = _model(lr_source="both")
    one = _model(lr_source="restorer")
    randomize_(one)
    state = one.state_dict()
    missing, unexpected = both.load_state_dict(state, strict=False)
    assert missing == ["lr_embed_extra.weight", "lr_embed_extra.bias"] and not unexpected
    C = one.cfg.in_channels
    z, lr, t = torch.randn(2, C, 8, 8), torch.randn(2, 2 * C, 8, 8), torch.full((2,), 0.7)
    torch.testing.assert_close(both(z, lr, t, prompt="positive"), one(z, lr[:, :C], t, prompt="positive"))
    randomize_(both)
    assert not torch.allclose(both(z, lr, t, prompt="positive"),
                              both(z, torch.cat([lr[:, :C], lr[:, C:] + 1], 1), t, prompt="positive"))
    with pytest.raises(ValueError, match="lr_source 'both'"):
        both(z, lr[:, :C], t, prompt="positive")


@pytest.mark.parametrize("kw, match", [
    (dict(lr_source="sideways"), "lr_source must be"),
    (dict(restorer=""), "needs the LR stream and a restorer"),
    (dict(residual_scale=-1.0), "residual_scale"),
    (dict(prediction="x_lr"), "residual flow"),
])
def test_bad_restorer_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _model(**kw)


@pytest.mark.parametrize("sampler, model_kw, match", [
    (dict(refine_t=1.0), {}, "refine_t"),
    (dict(jump="midpoint"), {}, "jump must be"),
    (dict(flat_detail=1.5), {}, "flat_detail must be"),
    (dict(flat_detail=0.5), dict(lr_source="bicubic"), "restorer-conditioned residual model"),
    (dict(flat_detail=0.5), dict(residual_scale=0.0), "restorer-conditioned residual model"),
])
def test_bad_samplers_are_refused(restorer_dir, sampler, model_kw, match):
    """A sampler's own ranges, and a flat_detail below 1 only for a pipeline whose model composes with R(LR)."""
    with pytest.raises(ValueError, match=match):
        _pipe(_model(**model_kw), SamplerConfig(**sampler))


def _tiny_images(root, n=4, size=48):
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        img.save(os.path.join(root, f"img{i}.png"))
    return str(root)


def _teacher_args(out, data, **extra):
    args = ["--preset", "micro", "--model-preset", "tiny-r", "--data", data, "--crop", "32", "--max-steps", "2",
            "--batch-size", "2", "--output-dir", str(out), "--num-workers", "0", "--ckpt-every", "2"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_pool_build_resume_and_batches(restorer_dir, tmp_path):
    from training.batches import StepBatches
    from training.config import TrainConfig
    from training.pool import build
    from training.shards import Pool

    data = _tiny_images(tmp_path / "imgs")
    out = tmp_path / "pool"
    build(str(out), data=data, count=5, crop=32, degradation="dit4sr", seed=0, shard=2)
    pool = Pool(str(out))
    assert len(pool) == 5 and pool.crop == 32
    hr, lr, r = pool[4]
    assert hr.shape == (3, 32, 32) and lr.shape == (3, 8, 8) and r.shape == (3, 32, 32)
    assert torch.equal(lr * 255, (lr * 255).round())  # the 8-bit LR, exactly
    # A second build with the same settings resumes (nothing to do); other settings are refused.
    first = open(out / "shard_00001.safetensors", "rb").read()
    build(str(out), data=data, count=5, crop=32, degradation="dit4sr", seed=0, shard=2)
    assert open(out / "shard_00001.safetensors", "rb").read() == first
    with pytest.raises(SystemExit, match="other settings"):
        build(str(out), data=data, count=5, crop=32, degradation="dit4sr", seed=1, shard=2)
    # Training batches from the pool: deterministic per step, the three images flipped together.
    cfg = TrainConfig(pool=str(out), crop=32, batch_size=4, max_steps=3)
    sb = StepBatches(cfg, 0, 1)
    a, b = sb[1], sb[1]
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    items = [pool[i] for i in range(len(pool))]
    hrs, lrs, rs_, _ = sb[2]
    for j in range(4):
        k = next(i for i, (h, _, _) in enumerate(items) if torch.equal(h, hrs[j]) or torch.equal(h.flip(-1), hrs[j]))
        flip = not torch.equal(items[k][0], hrs[j])
        h, low, r = (v.flip(-1) if flip else v for v in items[k])
        assert torch.equal(low, lrs[j]) and torch.equal(r, rs_[j])
    with pytest.raises(ValueError, match="32 px crops"):
        StepBatches(TrainConfig(pool=str(out), crop=64, batch_size=2, max_steps=1), 0, 1)


def test_train_with_restorer_on_device_and_from_pool_then_export_and_upscale(restorer_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from mfsr_fast.models import restorer as rs
    from mfsr_fast.pipeline import upscale as up
    from training import distill, export, teacher
    from training.pool import build

    def sampler(folder):
        return MFSRPipeline.from_pretrained(str(folder)).sampler

    data = _tiny_images(tmp_path / "imgs")
    assert teacher.main(_teacher_args(tmp_path / "t", data)) == 0
    build(str(tmp_path / "pool"), data=data, count=4, crop=32, degradation="dit4sr", seed=0, shard=4)
    assert teacher.main(_teacher_args(tmp_path / "tp", data, pool=tmp_path / "pool")) == 0
    log = [json.loads(x) for x in open(tmp_path / "tp" / "log.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in log)
    args = ["--preset", "micro", "--teacher", str(tmp_path / "tp"), "--pool", str(tmp_path / "pool"), "--crop", "32",
            "--max-steps", "2", "--batch-size", "2", "--output-dir", str(tmp_path / "s"), "--num-workers", "0",
            "--guidance", "1.5"]
    assert distill.main(args) == 0
    # Export carries the restorer; without $MFSR_RESTORER_DIR the folder still works on its own.
    assert export.main([str(tmp_path / "s"), str(tmp_path / "exp")]) == 0
    assert os.path.isfile(tmp_path / "exp" / "restorer" / "model.safetensors")
    info = json.load(open(tmp_path / "exp" / "info.json"))
    assert info["restorer"]["carried"] is True
    assert info["student_run"]["step"] == info["student"]["steps"] and "teacher" in info["student_run"]
    # A fine-tuned student (--init) exports its starting student's record too: a run's, nested, or a folder's info.
    def fine_tune(out, init):
        return distill.main([str(out) if a == str(tmp_path / "s") else a for a in args]
                            + ["--init", str(init), "--max-steps", "1"])

    assert fine_tune(tmp_path / "ft", tmp_path / "s") == 0
    assert export.main([str(tmp_path / "ft"), str(tmp_path / "ft_exp"), "--no-restorer"]) == 0
    ft = json.load(open(tmp_path / "ft_exp" / "info.json"))
    # (paths near the working folder are stored relative to it: export._portable)
    assert ft["student"]["steps"] == 1 and os.path.abspath(ft["student_config"]["init"]) == str(tmp_path / "s")
    assert ft["init"]["student_run"] == info["student_run"] and ft["init"]["student"] == info["student"]
    assert os.path.abspath(ft["init"]["student_config"]["output_dir"]) == str(tmp_path / "s")
    assert "init" not in ft["init"]
    assert fine_tune(tmp_path / "ft2", tmp_path / "exp") == 0
    assert export.main([str(tmp_path / "ft2"), str(tmp_path / "ft2_exp"), "--no-restorer"]) == 0
    assert json.load(open(tmp_path / "ft2_exp" / "info.json"))["init"] == info
    # The folder it started from now holds other weights: its record would describe another model, so it is left out.
    shutil.copytree(tmp_path / "exp", tmp_path / "exp_copy")
    assert fine_tune(tmp_path / "ft3", tmp_path / "exp_copy") == 0
    assert export.main([str(tmp_path / "ft"), str(tmp_path / "exp_copy"), "--no-restorer", "--overwrite"]) == 0
    capsys.readouterr()
    assert export.main([str(tmp_path / "ft3"), str(tmp_path / "ft3_exp"), "--no-restorer"]) == 0
    assert "init" not in json.load(open(tmp_path / "ft3_exp" / "info.json"))
    assert "no longer holds the weights the run started from" in capsys.readouterr().err
    assert export.main([str(tmp_path / "s"), str(tmp_path / "named"), "--no-restorer", "--refine-t", "0.06"]) == 0
    assert not os.path.exists(tmp_path / "named" / "restorer")
    assert sampler(tmp_path / "named").refine_t == 0.06
    assert sampler(tmp_path / "exp").refine_t == 0.0  # the micro preset's (the teacher's folder holds none)
    assert sampler(tmp_path / "exp").jump == "average"
    assert export.main([str(tmp_path / "s"), str(tmp_path / "end"), "--no-restorer", "--jump", "endpoint"]) == 0
    assert sampler(tmp_path / "end").jump == "endpoint"
    assert sampler(tmp_path / "end").refine_side == "below"
    assert export.main([str(tmp_path / "s"), str(tmp_path / "up"), "--no-restorer", "--refine-t", "0.7",
                        "--refine-side", "above"]) == 0
    above = sampler(tmp_path / "up")
    assert (above.refine_t, above.refine_side, above.jump) == (0.7, "above", "average")
    with pytest.raises(SystemExit, match="refine_t must be in"):
        export.main([str(tmp_path / "s"), str(tmp_path / "bad"), "--refine-t", "1.5"])
    assert not os.path.exists(tmp_path / "bad")
    assert export.main([str(tmp_path / "s"), str(tmp_path / "flat"), "--no-restorer", "--flat-detail", "0.25"]) == 0
    assert (sampler(tmp_path / "flat").flat_detail, sampler(tmp_path / "exp").flat_detail) == (0.25, 1.0)
    with pytest.raises(SystemExit, match="--flat-detail: flat_detail must be"):
        export.main([str(tmp_path / "s"), str(tmp_path / "bad"), "--flat-detail", "2"])
    assert not os.path.exists(tmp_path / "bad")
    img = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    a = upscale(img, model=str(tmp_path / "named"))
    monkeypatch.delenv("MFSR_RESTORER_DIR")
    up.clear_cache()
    rs.clear_cache()
    b = upscale(img, model=str(tmp_path / "exp"))
    assert a.shape == b.shape == (48, 64, 3)
    np.testing.assert_array_equal(a, b)  # the same student and the same restorer weights
    # The folder without its restorer, where none is installed: a clear error that says what to run.
    up.clear_cache()
    rs.clear_cache()
    monkeypatch.setattr(rs, "WEIGHTS_ROOT", str(tmp_path / "nothing-installed"))
    try:
        with pytest.raises(ValueError, match="python -m mfsr_fast.models.ncnn fetch"):
            MFSRPipeline.from_pretrained(str(tmp_path / "named"))
    finally:
        up.clear_cache()


def test_evaluate_realesrgan_method_shares_one_restored_image(restorer_dir, tmp_path, capsys):
    from PIL import Image

    from mfsr_fast.evaluation import cli as evaluate
    from mfsr_fast.evaluation.runner import RestoredCache, run_method, to_uint8

    rng = np.random.default_rng(0)
    for sub in ("HR", "LR"):
        os.makedirs(tmp_path / "ev" / sub)
    for i in range(2):
        hr = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        Image.fromarray(hr).save(tmp_path / "ev" / "HR" / f"p{i}.png")
        Image.fromarray(hr).resize((10, 8), Image.BICUBIC).save(tmp_path / "ev" / "LR" / f"p{i}.png")
    model = _model()
    model.save_pretrained(tmp_path / "m")
    # The fresh model outputs R(LR) itself, so its row equals the realesrgan row; R ran once per image.
    assert evaluate.main(["--data", str(tmp_path / "ev"), "--methods", "realesrgan,student:1,bicubic", "--model",
                          str(tmp_path / "m"), "--border", "0"]) == 0
    rows = {ln.split("|")[1].strip(): ln.split("|")[4:8] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| realesrgan") or ln.startswith("| student")}
    assert rows["realesrgan"] == rows["student:1"]
    cache = RestoredCache()
    lr = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    _, nfe, charge1 = run_method("realesrgan", lr, (32, 40), {}, None, 0, cache=cache, key="a")
    _, _, charge2 = run_method("realesrgan", lr, (32, 40), {}, None, 0, cache=cache, key="a")
    assert nfe == 1 and charge1 == 0.0 and charge2 == cache.seconds > 0
    # A student method's options reach the sampler: student:2:refine0.25:endpoint is that SamplerConfig.
    student = _pipe(randomize_(_model()), SamplerConfig(refine_t=0.06))
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    want = student.with_sampler(SamplerConfig(refine_t=0.25, jump="endpoint")).upscale_rgb(x, steps=2)
    got, nfe, _ = run_method("student:2:refine0.25:endpoint", lr, (32, 40), {"student": student}, None, 0,
                             cache=cache, key="a")
    plain, _, _ = run_method("student:2", lr, (32, 40), {"student": student}, None, 0, cache=cache, key="a")
    np.testing.assert_array_equal(got, to_uint8(want))
    assert nfe == 3 and np.abs(got.astype(int) - plain).max() > 0
    # A named student (--student NAME=FOLDER) runs as itself, on its own sampler, beside the main one.
    other = _pipe(randomize_(_model(), seed=1), SamplerConfig(refine_t=0.25, jump="endpoint"))
    named, nfe, _ = run_method("other:2", lr, (32, 40), {"student": student, "other": other}, None, 0, cache=cache,
                               key="a")
    alone, _, _ = run_method("student:2", lr, (32, 40), {"student": other}, None, 0, cache=cache, key="a")
    np.testing.assert_array_equal(named, alone)
    assert nfe == 3 and np.abs(named.astype(int) - plain).max() > 0
    other.save_pretrained(str(tmp_path / "other"), restorer=False)
    assert evaluate.main(["--data", str(tmp_path / "ev"), "--methods", "realesrgan,student:1,other:1", "--model",
                          str(tmp_path / "m"), "--student", f"other={tmp_path / 'other'}", "--border", "0"]) == 0
    rows = {ln.split("|")[1].strip(): ln.split("|")[4:8] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ")}
    assert rows["realesrgan"] == rows["student:1"] and rows["other:1"] != rows["student:1"]
    with pytest.raises(SystemExit, match="--student other="):
        evaluate.main(["--data", str(tmp_path / "ev"), "--methods", "other:1", "--student",
                       f"other={tmp_path / 'missing'}"])


def test_trajectories_build_resume_and_the_distillation_regression(restorer_dir, tmp_path, capsys, monkeypatch):
    """training.trajectories stores, per pool sample, a noise and the teacher's sample from it, with the conditioning
    the teacher saw; distill --trajectories regresses the student's one step onto them. A teacher with a constant
    h = t - r embedding (u(z, r, t) = v(z, t)) and one-step, unguided trajectories makes the regression exact, so
    its loss term is ~0 for the stored pairs and large for mismatched ones."""
    import copy

    from mfsr_fast.models.conditioning import lr_condition
    from training import components, distill, distill_loss
    from training.batches import StepBatches
    from training.distributed import Dist
    from training.pool import build as build_pool
    from training.trajectories import Trajectories, build, noise_for

    def load_anchor(c, teacher_=None):
        """What distill's main does with the --trajectory-* settings: check them, then load the anchor."""
        distill.check_trajectory_options(c)
        return components.load_anchor(c.trajectory_anchor, student, "cpu", teacher_) if c.trajectory_anchor else None

    data = _tiny_images(tmp_path / "imgs")
    build_pool(str(tmp_path / "pool"), data=data, count=3, crop=32, degradation="dit4sr", seed=0, shard=2)
    teacher = randomize_(_model())
    with torch.no_grad():
        teacher.h_embed.linear_2.weight.zero_()
        teacher.h_embed.linear_2.bias.zero_()
    teacher.save_pretrained(tmp_path / "t")
    out = tmp_path / "traj"
    kw = dict(pool=str(tmp_path / "pool"), teacher=str(tmp_path / "t"), count=3, steps=1, sampling="", shard=2,
              batch=2)
    build(str(out), **kw)
    traj = Trajectories(str(out))
    assert len(traj) == 3 and traj.meta["guidance"] == 1.0
    e, x, lr, restored = traj.take(torch.arange(3))
    assert torch.equal(e[2], noise_for(0, 2, tuple(e.shape[1:])).float())
    assert not torch.equal(e[0], e[1])
    codec = components.codec_for(teacher)
    c = lr_condition(teacher, codec, lr, restored)
    with torch.no_grad():
        v = teacher.field(e, c, torch.ones(3), prompt="positive")
    torch.testing.assert_close(x, e - v, rtol=2e-3, atol=2e-3)  # one Euler step, stored in fp16
    # Resumes with the same settings (nothing rebuilt), refuses others, and a missing shard is a clear error.
    first = open(out / "shard_00001.safetensors", "rb").read()
    build(str(out), **kw)
    assert open(out / "shard_00001.safetensors", "rb").read() == first
    with pytest.raises(SystemExit, match="other settings"):
        build(str(out), **{**kw, "steps": 2})
    other = copy.deepcopy(teacher)  # other weights at another path, then at the same path: never mixed in
    with torch.no_grad():
        other.proj_out.bias.add_(1e-3)
    other.save_pretrained(tmp_path / "t2")
    with pytest.raises(SystemExit, match="another teacher"):
        build(str(out), **{**kw, "teacher": str(tmp_path / "t2")})
    shutil.copytree(tmp_path / "t", tmp_path / "t_copy")  # the same weights elsewhere: the same teacher
    build(str(out), **{**kw, "teacher": str(tmp_path / "t_copy")})
    meta = json.loads((out / "trajectories.json").read_text())  # a folder from before the digest was recorded:
    (out / "trajectories.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "teacher_weights"}))
    with pytest.raises(SystemExit, match="another teacher"):  # ... only its teacher path resumes it
        build(str(out), **{**kw, "teacher": str(tmp_path / "t")})
    build(str(out), **{**kw, "teacher": str(tmp_path / "t_copy")})
    assert json.loads((out / "trajectories.json").read_text()) == meta
    with pytest.raises(SystemExit, match="bad part"):
        build(str(tmp_path / "bad"), **{**kw, "sampling": "cfg1.5:sideways"})
    with pytest.raises(SystemExit, match="holds 3 samples"):
        build(str(tmp_path / "bad"), **{**kw, "count": 4})
    with pytest.raises(SystemExit, match="--device: device 'warp'"):
        build(str(tmp_path / "bad"), **{**kw, "device": "warp"})
    assert not os.path.exists(tmp_path / "bad")

    cfg = distill.DistillConfig(pool=str(tmp_path / "pool"), crop=32, batch_size=2, loss_p=0.0, guidance=1.0,
                                teacher=str(tmp_path / "t"), trajectories=str(out), trajectory_batch=3)
    student = copy.deepcopy(teacher)
    batch = StepBatches(cfg, 0, 1)[0]

    def loss(traj_):
        fn = distill_loss.make_loss(cfg, teacher, codec, traj_)
        with torch.no_grad():
            return float(fn(student.field, student, batch, 0, Dist())[0])

    plain = loss(None)
    assert abs(loss(distill.load_trajectories(cfg, student)) - plain) < 1e-2  # p = 0: the summed squared error
    assert "another teacher" not in capsys.readouterr().err
    distill.load_trajectories(dataclasses.replace(cfg, teacher=str(tmp_path / "t_copy")), student)
    assert "another teacher" not in capsys.readouterr().err
    distill.load_trajectories(cfg, other)
    assert "another teacher" in capsys.readouterr().err
    distill.load_trajectories(cfg, other, components.weights_digest(teacher))  # --init: other weights, the same teacher
    assert "another teacher" not in capsys.readouterr().err
    # An anchor's one step blended into the target: the teacher as its own anchor changes nothing; another anchor
    # adds (1 - mix)^2 |x_anchor - x_T|^2 over the same drawn pairs, so two mixes' excesses stand as (1 - mix)^2.
    traj = distill.load_trajectories(cfg, student)

    def mixed(path, mix, **kw):
        c = dataclasses.replace(cfg, trajectory_anchor=str(path) if path else "", trajectory_mix=mix, **kw)
        fn = distill_loss.make_loss(c, teacher, codec, traj, load_anchor(c))
        with torch.no_grad():
            return float(fn(student.field, student, batch, 0, Dist())[0])

    assert abs(mixed(tmp_path / "t_copy", 0.3) - plain) < 1e-2
    excess = [mixed(tmp_path / "t2", m) - plain for m in (0.0, 0.5)]
    assert excess[0] > 1e-3 and excess[1] == pytest.approx(excess[0] / 4, rel=0.05)
    # The first jump 1 -> refine_t trained on the same line: the same loss while u does not depend on r, another
    # once it does.
    assert abs(mixed(None, 1.0, refine_t=0.25, trajectory_refine=1.0) - plain) < 1e-2
    r_dep = copy.deepcopy(student)
    with torch.no_grad():
        r_dep.h_embed.linear_2.weight.normal_()
    fn = distill_loss.make_loss(dataclasses.replace(cfg, refine_t=0.25, trajectory_refine=1.0), teacher, codec, traj)
    fn0 = distill_loss.make_loss(cfg, teacher, codec, traj)
    with torch.no_grad():
        assert abs(float(fn(r_dep.field, r_dep, batch, 0, Dist())[0])
                   - float(fn0(r_dep.field, r_dep, batch, 0, Dist())[0])) > 1e-3
    # --trajectory-line: every stored pair trained at a point of its straight line, z = (1 - t) x + t e, with the
    # line's velocity e - x as the target, so z - t v and z + (1 - t) v give back the stored sample and noise.
    seen = []
    real = distill_loss.meanflow_target
    monkeypatch.setattr(distill_loss, "meanflow_target", lambda fn_, z, t, r, v, **kw: seen.append((z, t, r, v)) or
                        real(fn_, z, t, r, v, **kw))
    c = dataclasses.replace(cfg, trajectory_line=1.0, trajectory_batch=16)
    with torch.no_grad():
        distill_loss.make_loss(c, teacher, codec, traj)(student.field, student, batch, 0, Dist())
    (z, t, r, v), = seen
    z, t, r, v = z[2:], t[2:], r[2:], v[2:]  # the batch's two MeanFlow rows first
    assert ((t >= distill_loss.LINE_T_MIN) & (t <= 1) & (r >= 0) & (r < t)).all()
    assert (r == 0).any() and (r > 0).any() and (t < 0.1).any() and (t > 0.1).any()
    tb = t.view(-1, 1, 1, 1)
    samples, noises = traj.tensors["sample"].float(), traj.tensors["noise"].float()
    for x_back, e_back in zip(z - tb * v, z + (1 - tb) * v):
        i = int(((samples - x_back) ** 2).flatten(1).sum(1).argmin())
        torch.testing.assert_close(x_back, samples[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(e_back, noises[i], rtol=0, atol=1e-4)
    # --trajectory-anchor teacher: the teacher's own one Euler step (r = t = 1) blended in, on a teacher whose field
    # depends on r, so a call at r = 0 (a student's one step) would give another target.
    r_teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        r_teacher.h_embed.linear_2.weight.normal_()
    c = dataclasses.replace(cfg, trajectory_anchor="teacher", trajectory_mix=0.25)
    assert load_anchor(c, r_teacher) is r_teacher
    seen.clear()
    with torch.no_grad():
        distill_loss.make_loss(c, r_teacher, codec, traj, r_teacher)(student.field, student, batch, 0, Dist())
    (z, t, r, v), = seen
    e2, v2 = z[2:], v[2:]
    assert (t[2:] == 1).all()
    idx = torch.stack([((noises - e_) ** 2).flatten(1).sum(1).argmin() for e_ in e2])
    e_, x_, lr_, restored_ = traj.take(idx)
    c2 = lr_condition(r_teacher, codec, lr_, restored_)
    ones = torch.ones(len(idx))
    with torch.no_grad():
        x_a = e_ - r_teacher.field(e_, c2, ones, ones, prompt="positive")
        x_r0 = e_ - r_teacher.field(e_, c2, ones, torch.zeros_like(ones), prompt="positive")
    assert (x_a - x_r0).abs().max() > 1e-2
    torch.testing.assert_close(v2, e_ - (0.25 * x_ + 0.75 * x_a), rtol=0, atol=1e-4)
    for bad, match in ((dict(trajectory_mix=0.5), "give --trajectory-anchor"),
                       (dict(trajectory_line=0.6, trajectory_refine=0.5, refine_t=0.1), "sum must be <= 1"),
                       (dict(trajectory_line=-0.1), "trajectory-line must be in"),
                       (dict(trajectories="", trajectory_line=0.5), "need --trajectories"),
                       (dict(trajectory_refine=0.5), "needs --refine-t"),
                       (dict(trajectory_anchor=str(tmp_path / "t2"), trajectory_mix=1.5), "in \\[0, 1\\]"),
                       (dict(trajectory_anchor=str(tmp_path / "t2")), "with --trajectory-mix < 1"),
                       (dict(trajectory_anchor=str(tmp_path / "nowhere"), trajectory_mix=0.5), "trajectory-anchor"),
                       (dict(trajectories="", trajectory_anchor=str(tmp_path / "t2")), "need --trajectories")):
        with pytest.raises(SystemExit, match=match):
            load_anchor(dataclasses.replace(cfg, **bad))
    flat = copy.deepcopy(teacher)
    flat.register_to_config(residual_scale=0.5)
    flat.cfg = dataclasses.replace(flat.cfg, residual_scale=0.5)
    flat.save_pretrained(tmp_path / "t_flat")
    with pytest.raises(SystemExit, match="residual_scale 0.5"):
        load_anchor(dataclasses.replace(cfg, trajectory_anchor=str(tmp_path / "t_flat"), trajectory_mix=0.5))
    traj.tensors["sample"] = traj.tensors["sample"].roll(1, 0)  # each noise paired with another sample's target
    assert loss(traj) - plain > 1.0
    os.remove(out / "shard_00000.safetensors")
    with pytest.raises(SystemExit, match="shards missing"):
        distill.load_trajectories(cfg, student)
