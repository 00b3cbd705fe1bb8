"""``python -m mfsr_fast``: the upscaling command line (same as ``mfsr-upscale``)."""

import sys

from mfsr_fast.apps.cli import main

sys.exit(main())
