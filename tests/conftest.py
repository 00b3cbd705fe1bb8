"""Shared test helpers and the one tolerance table of the suite.

Tolerance rule (STYLE.md): a kernel's error against an fp64 reference may be at most ``RATIO`` times the error of the
same-dtype PyTorch reference against fp64, plus ``ATOL[dtype]`` times the largest magnitude of the fp64 result (about
half a unit in the last place of the dtype at that scale, at least at scale 1: on small tensors the reference can
be luckier than that, and an exactly zero result still allows rounding noise).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before any triton import: without a GPU the kernels run through the Triton interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

RATIO = 2.0
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def float32_machine(monkeypatch):
    """Every test runs as on a CPU without native bfloat16 (float32 throughout), so that its expected values do not
    depend on the machine; tests/test_precision.py sets the answers it checks. (Subprocesses see the real one.)"""
    try:
        from mfsr_fast.pipeline import loading
    except ImportError:  # GPU check machines may lack diffusers
        return
    monkeypatch.setattr(loading, "native_bf16", lambda: None)


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs are filled with NaN before launch (``kernels.common.POISON``): an element a kernel fails to
    write shows up as NaN instead of passing with whatever memory held."""
    from kernels import common

    monkeypatch.setattr(common, "POISON", True)


def assert_close_to_ref(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref64: torch.Tensor, name: str = "") -> None:
    """The tolerance rule: |out - ref64| <= RATIO * max|ref_same_dtype - ref64| + ATOL * max|ref64|, and no NaN."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten element?)"
    err = (out.double() - ref64).abs().max().item()
    base = (ref_same_dtype.double() - ref64).abs().max().item()
    bound = RATIO * base + ATOL[out.dtype] * max(ref64.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: error {err:.3e} > {RATIO} x reference error {base:.3e} + atol (bound {bound:.3e})"


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Replace every parameter by fresh random values (zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        base = 1.0 if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name else 0.0
        if p.dim() == 1:
            p.copy_(base + std * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)  # unit-variance activations for any fan-in
    return model


def micro_model(dtype=torch.float32, **overrides):
    """A few-thousand-parameter MFSRTransformer with every feature on (LR stream, context, pooled, dual attention)."""
    from mfsr_fast import MFSRTransformer  # needs diffusers, which GPU check machines may lack

    kw = dict(in_channels=4, num_layers=2, num_heads=2, head_dim=8, context_dim=6, pooled_dim=5, sample_size=8,
              pos_embed_max_size=16, dual_attention_layers=(0,))
    kw.update(overrides)
    m = randomize_(MFSRTransformer.from_preset("tiny", **kw))
    return m if dtype == torch.float32 else m.to(dtype)


def micro_inputs(model, B: int = 2, H: int = 8, W: int = 6, seed: int = 1, Lc: int = 3):
    g = torch.Generator().manual_seed(seed)
    dtype = model.dtype
    cfg = model.cfg
    z = torch.randn(B, cfg.in_channels, H, W, generator=g, dtype=torch.float64).to(dtype)
    lr = torch.randn(B, model.lr_channels, H, W, generator=g, dtype=torch.float64).to(dtype) if cfg.lr_stream else None
    ctx = torch.randn(B, Lc, cfg.context_dim, generator=g, dtype=torch.float64).to(dtype) if cfg.context_dim else None
    pooled = torch.randn(B, cfg.pooled_dim, generator=g, dtype=torch.float64).to(dtype) if cfg.pooled_dim else None
    t = torch.rand(B, generator=g, dtype=torch.float64).clamp(0.2, 0.9).to(torch.promote_types(dtype, torch.float32))
    r = t * torch.rand(B, generator=g, dtype=torch.float64).to(t.dtype)
    return dict(z=z, lr=lr, t=t, r=r, context=ctx, pooled=pooled)


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {os.path.abspath(SHARED_DATA)}")
    return SHARED_DATA


def random_rrdbnet(seed: int = 0, weight_std: float = 0.1, bias_std: float = 0.05, **cfg):
    """An RRDBNet (``cfg``: its constructor's arguments) with normal random weights and biases drawn from ``seed``."""
    from mfsr_fast.models.restorer import RRDBNet

    torch.manual_seed(seed)
    net = RRDBNet(**cfg)
    with torch.no_grad():
        for m in net.conv_layers():
            m.weight.normal_(0, weight_std)
            m.bias.normal_(0, bias_std)
    return net


def small_restorer_folder(folder, seed: int = 0, num_feat: int = 8, num_grow_ch: int = 4) -> str:
    """A 1-block RRDBNet restorer with random weights, saved as ``mfsr_fast.models.restorer`` saves the real one
    (config.json + model.safetensors + info.json): a fast stand-in for Real-ESRGAN x4plus."""
    import json

    from safetensors.torch import save_file

    net = random_rrdbnet(seed, 0.05, 0.02, num_feat=num_feat, num_block=1, num_grow_ch=num_grow_ch)
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)  # outputs around mid-grey, not clamped to 0
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(net.config, scale=4), f)
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump({"name": "test restorer", "licence": "test"}, f)
    return str(folder)


@pytest.fixture
def restorer_dir(tmp_path, monkeypatch):
    """A small restorer installed under the name the presets use, found through $MFSR_RESTORER_DIR."""
    from mfsr_fast.models import restorer as rs
    from mfsr_fast.pipeline import upscale as up

    root = tmp_path / "restorers"
    small_restorer_folder(root / "realesrgan-x4plus")
    monkeypatch.setenv("MFSR_RESTORER_DIR", str(root))
    rs.clear_cache()
    up.clear_cache()
    yield root
    rs.clear_cache()
    up.clear_cache()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 1-block random model with learned prompts and the pixel codec (fast; outputs are not meant to look good)."""
    from mfsr_fast.models.transformer import MFSRTransformer

    torch.manual_seed(0)
    m = MFSRTransformer.from_preset("tiny", num_layers=1, num_heads=2, head_dim=16, dual_attention_layers=(0,))
    randomize_(m, std=0.05)
    d = tmp_path_factory.mktemp("model")
    m.save_pretrained(str(d))
    return str(d)
