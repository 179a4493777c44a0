"""``python -m trainer`` (and ``torchrun -m trainer``) is ``cxr-train``."""

import sys

from .cli import main

sys.exit(main())
