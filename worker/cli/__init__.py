"""`cxr-worker` commands: serve, classify, results, status (main), send and echo (scu)."""

from .main import main

__all__ = ["main"]
