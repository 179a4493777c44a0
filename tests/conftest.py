"""Fixtures for every test; helpers live in the importable package tests/testkit."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.env import IN_CI, KAGGLE_ROOT
from testkit.postgres import postgres_cluster


def pytest_addoption(parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the long soak variants (marker 'slow'; or set CXR_SOAK=1)")


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


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster for the module's tests (testkit/postgres.py)."""
    yield from postgres_cluster()
