"""Fixtures of the real-process tests."""

from __future__ import annotations

import pytest

from testkit.worker_process import StoreSCP


@pytest.fixture(scope="module")
def destination(tmp_path_factory):
    """A DCMTK storescp the module's workers deliver their SRs to (one per test module)."""
    with StoreSCP(tmp_path_factory.mktemp("dest") / "in") as scp:
        yield scp
