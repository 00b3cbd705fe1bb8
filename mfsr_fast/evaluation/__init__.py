"""How good an upscaler is: the literature's measures and this project's texture guard (``metrics``), LPIPS and DISTS
from local weights (``perceptual``), the method language of the table (``methods``), running methods on HR/LR pairs
(``runner``), the table and per-image rows (``report``) and the command ``python -m mfsr_fast.evaluation`` (``cli``).

Above ``mfsr_fast.pipeline``, below ``mfsr_fast.apps``.
"""
