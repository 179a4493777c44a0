"""The architecture's one-way doors (docs/architecture.md) as import-linter contracts.

The contracts live in pyproject.toml ([tool.importlinter]); this runs them over the real import graph,
so a forbidden import (say, worker.store importing pynetdicom, or dicom_io importing torch) fails the
suite. `lint-imports` on the command line prints the same report.
"""

from __future__ import annotations

import contextlib
import io

from importlinter.cli import lint_imports

from testkit.env import REPO_ROOT


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = lint_imports(config_filename=str(REPO_ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = out.getvalue()
    assert "BROKEN" not in report and code == 0, report
    assert "Contracts: 10 kept, 0 broken." in report, report
