"""Prompt files: conversion from .pt with weights_only, validation, storage inside the model."""

from __future__ import annotations

import pytest
import torch

from mfsr_fast.models.prompts import load_prompts, main, save_prompts, stacked
from mfsr_fast.models.transformer import PROMPT_NAMES, MFSRTransformer


def _emb(seed, L=7, D=128, P=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, L, D, generator=g), torch.randn(1, P, generator=g)


def test_convert_pt_files_in_every_accepted_form(tmp_path, capsys):
    pos, pos_pooled = _emb(0)
    neg, neg_pooled = _emb(1)
    torch.save(pos, tmp_path / "pos.pt")
    torch.save(pos_pooled, tmp_path / "pos_pooled.pt")
    torch.save({"prompt_embeds": pos, "pooled_prompt_embeds": pos_pooled, "negative_prompt_embeds": neg,
                "negative_pooled_prompt_embeds": neg_pooled}, tmp_path / "both.pt")
    torch.save((neg[0], neg_pooled[0]), tmp_path / "neg_pair.pt")
    out = tmp_path / "p.safetensors"
    assert main(["--positive", str(tmp_path / "pos.pt"), "--positive-pooled", str(tmp_path / "pos_pooled.pt"),
                 "--negative", str(tmp_path / "both.pt"), "--negative-text", "blurry", "--out", str(out)]) == 0
    assert "positive, negative" in capsys.readouterr().out
    p = load_prompts(str(out))
    torch.testing.assert_close(p["positive"][0], pos[0])
    torch.testing.assert_close(p["positive"][1], pos_pooled[0])
    torch.testing.assert_close(p["negative"][0], neg[0])  # the dict's negative_* keys for --negative
    assert torch.count_nonzero(p["null"][0]) == 0 and p["null"][1].shape == (128,)
    assert main(["--positive", str(tmp_path / "both.pt"), "--negative", str(tmp_path / "neg_pair.pt"),
                 "--out", str(out)]) == 0
    torch.testing.assert_close(load_prompts(str(out))["negative"][1], neg_pooled[0])


def test_converter_refuses_pickled_code_and_bad_shapes(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"prompt_embeds": Evil()}, tmp_path / "evil.pt")
    assert main(["--positive", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only" in err and "pwned" not in err
    assert not (tmp_path / "o.safetensors").exists()
    torch.save(torch.randn(2, 7, 128), tmp_path / "batch.pt")
    assert main(["--positive", str(tmp_path / "batch.pt"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "batch of 2" in capsys.readouterr().err
    a, ap = _emb(0, L=7)
    b, bp = _emb(1, L=9)
    with pytest.raises(ValueError, match="share one shape"):
        save_prompts(str(tmp_path / "x.safetensors"), {"positive": (a[0], ap[0]), "negative": (b[0], bp[0])})
    with pytest.raises(ValueError, match="positive prompt is required"):
        save_prompts(str(tmp_path / "x.safetensors"), {"negative": (a[0], ap[0])})
    with pytest.raises(ValueError, match="not found"):
        load_prompts(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_prompts(str(tmp_path / "junk.safetensors"))


def test_prompts_stored_in_the_model_travel_with_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = MFSRTransformer.from_preset("tiny", num_layers=1, dual_attention_layers=(), learned_prompts=0)
    pos, pos_pooled = _emb(0)
    neg, neg_pooled = _emb(1)
    save_prompts(str(tmp_path / "p.safetensors"), {"positive": (pos[0], pos_pooled[0]),
                                                   "negative": (neg[0], neg_pooled[0])})
    ctx, pooled = stacked(load_prompts(str(tmp_path / "p.safetensors")))
    assert ctx.shape == (3, 7, 128) and pooled.shape == (3, 128)
    model.set_prompts(ctx, pooled)
    assert model.cfg.learned_prompts == 7 and not model.prompt_context.requires_grad
    c, p = model.prompt("negative", 2)
    torch.testing.assert_close(c[1], neg[0])
    model.save_pretrained(tmp_path / "m")
    again = MFSRTransformer.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.prompt("positive")[1][0], pos_pooled[0])
    assert torch.count_nonzero(again.prompt("null")[0]) == 0
    assert again.prompt_context.shape[0] == len(PROMPT_NAMES)
    with pytest.raises(ValueError, match="prompt context must be"):
        model.set_prompts(torch.zeros(3, 7, 64), pooled)
