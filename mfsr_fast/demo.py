"""`make demo`: upscale real photographs with the embedded default model.

The embedded default model (a small teacher trained with ``python -m training.teacher`` and distilled with
``python -m training.distill``) and ``mfsr_fast.upscale`` are not part of this build yet; until they land, the demo
says so and exits with status 1 instead of showing output from an untrained network.
"""

from __future__ import annotations

import sys


def main() -> int:
    print("mfsr-fast demo: the embedded default model and mfsr_fast.upscale() are not in this build yet "
          "(see the README's status table). Nothing was upscaled.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
