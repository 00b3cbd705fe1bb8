"""mfsr-fast: one-step real-world image super-resolution by MeanFlow distillation of a DiT4SR-style teacher.

``upscale(image)`` for one call; ``MFSRPipeline.from_pretrained(folder)`` for the parts (transformer, codec, restorer,
sampler); ``MFSRTransformer`` / ``MFSRConfig`` for the network. The package's rooms, lowest first: ``io``, ``models``,
``sampling``, ``pipeline``, ``evaluation``, ``apps`` (each imports only from those below it).
"""

__version__ = "0.1.0"

from mfsr_fast.models.transformer import PRESETS, MFSRConfig, MFSRTransformer  # noqa: E402
from mfsr_fast.pipeline.pipeline import MFSRPipeline  # noqa: E402
from mfsr_fast.pipeline.upscale import upscale  # noqa: E402
from mfsr_fast.sampling.config import SamplerConfig, TeacherSampling  # noqa: E402

__all__ = ["upscale", "MFSRPipeline", "SamplerConfig", "TeacherSampling", "MFSRTransformer", "MFSRConfig", "PRESETS"]
