"""Where the repository and the shared data live, and the external programs tests need.

A program that is missing makes a test skip locally and FAIL when CI=true (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CXR_SHARED", REPO_ROOT.parent / "shared"))
KAGGLE_ROOT = SHARED / "data" / "chest_xray224"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(*names: str) -> None:
    """Skip locally when an external program (DCMTK, Orthanc, dicom3tools...) is missing; fail in CI."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = f"required program(s) not installed: {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message + " (CI=true: .ci/run must install them)")
        pytest.skip(message)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@lru_cache(maxsize=None)
def _find_dcmtk(name: str) -> str | None:
    candidates = [os.path.join(d, name) for d in os.environ.get("PATH", "").split(os.pathsep)]
    candidates += [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    for path in candidates:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def dcmtk(name: str) -> str:
    """Path of DCMTK's program ``name``; skip locally / fail in CI when absent.

    pynetdicom installs Python apps named storescu/echoscu/storescp that may come first on PATH
    (pyenv shims), so the real binary is found by asking ``--version``.
    """
    path = _find_dcmtk(name)
    if path is None:
        message = f"DCMTK {name} not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: .ci/run must install dcmtk)")
        pytest.skip(message)
    return path
