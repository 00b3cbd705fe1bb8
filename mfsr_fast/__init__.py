"""mfsr-fast: one-step real-world image super-resolution by MeanFlow distillation of a DiT4SR-style teacher."""

from mfsr_fast.inference import load_model, upscale
from mfsr_fast.model import PRESETS, MFSRConfig, MFSRTransformer

__all__ = ["MFSRTransformer", "MFSRConfig", "PRESETS", "upscale", "load_model"]
__version__ = "0.1.0"
