"""`python -m worker` = the `cxr-worker` command."""

import sys

from .cli import main

sys.exit(main())
