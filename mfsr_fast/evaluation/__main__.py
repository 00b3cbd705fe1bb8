"""``python -m mfsr_fast.evaluation``: the evaluation table (``evaluation.cli``)."""

import sys

from mfsr_fast.evaluation.cli import main

sys.exit(main())
