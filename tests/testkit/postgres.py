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


class PostgresServer:
    """A running throwaway cluster: its URL, and stop()/start() of its server (the data stays)."""

    def __init__(self, bindir: Path, root: Path, as_pg: list[str]) -> None:
        self.bindir, self.root, self.as_pg = bindir, root, as_pg
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run([*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                        "-w", "-t", "60", "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
                        "start"], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        subprocess.run([*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)


def postgres_server():
    """A throwaway PostgreSQL cluster on a free port; yields its PostgresServer (a generator for a fixture)."""
    bindir = _pg_bin()
    if bindir is None or shutil.which("runuser") is None:
        message = "PostgreSQL server binaries not installed (apt-get install postgresql)"
        if IN_CI:
            pytest.fail(message + " (CI=true: .ci/run must install it)")
        pytest.skip(message)
    # pytest's tmp dirs are root-only (0700); the server runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    server = PostgresServer(bindir, root, as_pg)
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def postgres_cluster():
    """A throwaway PostgreSQL cluster on a free port; yields its SQLAlchemy URL (a generator for a fixture)."""
    servers = postgres_server()
    server = next(servers)
    try:
        yield server.url
    finally:
        servers.close()  # stops the server, removes its files


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
