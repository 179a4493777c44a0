"""`python -m worker` = the `cxr-worker` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned decode process imports the main module
    sys.exit(main())
