"""Shared test helpers: where the real data lives, and external tools that must exist in CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def kaggle_root() -> Path:
    """The shared Kaggle training data (../shared/data/chest_xray224); must exist in CI."""
    if not (KAGGLE_ROOT / "train").is_dir():
        if IN_CI:
            pytest.fail(f"{KAGGLE_ROOT} missing in CI")
        pytest.skip(f"{KAGGLE_ROOT} not available")
    return KAGGLE_ROOT


@pytest.fixture(scope="session")
def kaggle_jpegs(kaggle_root: Path) -> dict[str, list[Path]]:
    """A few real JPEGs per class, sorted (deterministic)."""
    return {cls: sorted((kaggle_root / "train" / cls).glob("*.jpeg"))[:8] for cls in ("NORMAL", "PNEUMONIA")}
