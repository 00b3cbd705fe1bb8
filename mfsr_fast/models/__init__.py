"""The networks and what they read and write: the MM-DiT transformer with its LR stream (``transformer``, its
tangent pairs ``tangent`` and input ``checks``), what its LR stream sees (``conditioning``), the codecs between images
and its space (``codec``), stored prompt embeddings (``prompts``), the frozen restorer Real-ESRGAN x4plus
(``restorer``) and the converters of released checkpoints (``convert``: DiT4SR / SD3.5; ``ncnn``: Real-ESRGAN's).

Above ``mfsr_fast.io``, below ``mfsr_fast.sampling``: nothing here knows how a model is sampled.
"""
