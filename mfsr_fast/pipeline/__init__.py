"""An image in, an image out: ``MFSRPipeline`` (``pipeline``: the transformer, codec, restorer and sampler it owns,
``from_pretrained`` / ``save_pretrained``), the one-call ``upscale`` (``upscale``), model folders and teachers
(``loading``), tiles and rows in bounded memory (``tiling``, ``rows``), the composition with R(LR) and the colour fix
(``compose``, ``texture``) and the checks every way in shares (``inputs``).

Above ``mfsr_fast.sampling``, below ``mfsr_fast.evaluation`` and ``mfsr_fast.apps``.
"""
