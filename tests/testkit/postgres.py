"""A throwaway PostgreSQL cluster (Debian's postgresql package) on a free loopback port.

Started as the ``postgres`` user when the tests run as root; CI installs the server.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .env import IN_CI, free_port


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres_cluster():
    """A throwaway PostgreSQL cluster on a free port; yields its SQLAlchemy URL (a generator for a fixture)."""
    bindir = _pg_bin()
    if bindir is None or shutil.which("runuser") is None:
        message = "PostgreSQL server binaries not installed (apt-get install postgresql)"
        if IN_CI:
            pytest.fail(message + " (CI=true: .ci/run must install it)")
        pytest.skip(message)
    # pytest's tmp dirs are root-only (0700); the server runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new empty database ``name`` on the cluster of ``url`` (dropped first if it exists); its URL.
    Lets the tests of one module share a cluster without sharing tables."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"
