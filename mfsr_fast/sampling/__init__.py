"""How a model is sampled: MeanFlow's math (``meanflow``: the training target, the time grids and jumps), the
samplers a pipeline holds (``config``: ``SamplerConfig`` for a student, ``TeacherSampling`` for a teacher, saved as
``sampler_config.json``) and the teacher's classifier-free guidance (``guidance``).

Above ``mfsr_fast.models``, below ``mfsr_fast.pipeline``: nothing here knows about images or tiles.
"""
