"""``python -m minialign`` is the ``minialign`` command (also under ``torchrun ... -m minialign``)."""

import sys

from .runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
