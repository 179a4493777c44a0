"""Helpers for the worker tests: a real `cxr-worker serve` subprocess, DCMTK programs, DICOM wraps.

Not a test module; tests import it as `from testkit.worker_process import ...`.

DCMTK programs: use testkit.env.dcmtk(name) (pynetdicom's same-named apps may come first on PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pydicom

from testkit.env import IN_CI, REPO_ROOT, dcmtk, free_port  # noqa: F401 (re-exported for tests)

START_TIMEOUT_S = 60.0


@lru_cache(maxsize=1)
def shared_runner():
    """The shipped model loaded once in the test process (worker/scoring.ModelRunner, as the server uses)."""
    from worker.scoring.runner import ModelRunner

    return ModelRunner(device="cpu", decode_threads=1)


def wrap_jpeg(jpeg: Path, out: Path, *, study_uid: str | None = None, patient_name: str | None = None,
              patient_id: str | None = None, **attributes) -> Path:
    """A Kaggle JPEG as a DX DICOM file (worker/wrap.wrap_image_as_dicom), extra attributes applied."""
    from worker.cli.wrap import wrap_image_as_dicom

    ds = wrap_image_as_dicom(jpeg, patient_id=patient_id, patient_name=patient_name, study_uid=study_uid)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def db_rows(data_dir: Path, sql: str, *params) -> list[tuple]:
    """Rows of a raw SQL query on a worker's SQLite database (read-only checks in tests)."""
    con = sqlite3.connect(Path(data_dir) / "worker.db", timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _parent_pid(stat: Path) -> int | None:
    """The parent pid in a /proc/<pid>/stat file (None when the process is gone)."""
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def partial_receptions(data_dir: Path) -> list[Path]:
    """Files under data_dir's incoming/ (each worker's incoming/<owner>/), its workers' lock files aside."""
    return [p for p in (Path(data_dir) / "incoming").rglob("*") if p.is_file() and p.name != ".lock"]


def url_rows(url: str, sql: str, *params) -> list[tuple]:
    """Rows of a raw SQL query (``?`` placeholders) on any SQLAlchemy database URL (read-only checks)."""
    from sqlalchemy import create_engine, text

    parts = sql.split("?")
    bound = "".join(part + (f":p{i}" if i < len(parts) - 1 else "") for i, part in enumerate(parts))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(bound), {f"p{i}": v for i, v in enumerate(params)})]
    finally:
        engine.dispose()


class WorkerProcess:
    """`cxr-worker serve` as a real subprocess on a free port with its own data directory."""

    def __init__(self, data_dir: Path, *, port: int | None = None, quiet: float = 0.5,
                 destinations: list[dict] | None = None, env: dict[str, str] | None = None,
                 ae_title: str = "CXR_WORKER", tls=None, database_url: str | None = None,
                 name: str | None = None, launcher: tuple[str, ...] = ()) -> None:
        """``database_url``: a shared database (e.g. PostgreSQL) instead of data_dir's SQLite file;
        ``name``: the log file's name when several workers share ``data_dir``; ``launcher``: a command
        the worker runs under (e.g. ``unshare --pid --fork --kill-child --mount-proc``)."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.http_port = free_port()  # the HTTP face (/healthz, /readyz, /metrics, pages) on loopback
        self.ae_title = ae_title
        self.tls = tls  # ssl.SSLContext for echo() when the worker listens with DICOM TLS
        self.database_url = database_url
        self.launcher = tuple(launcher)
        self.log_path = self.data_dir.parent / f"{name or self.data_dir.name}.log"
        self.env = dict(os.environ)
        self.env.update({
            "CXR_WORKER__STORAGE__DATA_DIR": str(self.data_dir),
            "CXR_WORKER__NETWORK__PORT": str(self.port),
            "CXR_WORKER__NETWORK__BIND_ADDRESS": "127.0.0.1",
            "CXR_WORKER__NETWORK__AE_TITLE": ae_title,
            "CXR_WORKER__HTTP__PORT": str(self.http_port),
            "CXR_WORKER__HTTP__BIND_ADDRESS": "127.0.0.1",
            "CXR_WORKER__STUDIES__QUIET_SECONDS": str(quiet),
            "CXR_WORKER__OUTBOX__RETRY_BASE_SECONDS": "0.5",
            "CXR_WORKER__OUTBOX__RETRY_MAX_SECONDS": "1.0",
            "CXR_WORKER__OUTBOX__TIMEOUT": "5",
            "CXR_WORKER__OUTBOX__POLL_SECONDS": "0.1",
            "CXR_WORKER__MODEL__DECODE_THREADS": "1",
            # heatmap objects only where a test is about them (tests/system/test_heatmaps.py sets
            # CXR_WORKER__HEATMAP__STUDIES): the other tests count the SRs a destination receives
            "CXR_WORKER__HEATMAP__STUDIES": "none",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if database_url is not None:
            self.env["CXR_WORKER__STORAGE__DATABASE_URL"] = database_url
        if destinations is not None:
            inline = ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"
                               for d in destinations)
            self.env["CXR_WORKER__DESTINATIONS"] = f"[{inline}]"
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None

    def serve_args(self) -> list[str]:
        """Arguments after `cxr-worker serve` (none: the environment configures it)."""
        return []

    def start(self) -> "WorkerProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([*self.launcher, sys.executable, "-m", "worker", "serve", *self.serve_args()],
                                            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if self.echo():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"worker did not answer C-ECHO within {START_TIMEOUT_S} s:\n{self.log()}")

    def echo(self) -> bool:
        from worker.net.scu import echo

        try:
            return echo("127.0.0.1", self.port, self.ae_title, "TEST_SCU", tls=self.tls, timeout=2) == 0
        except Exception:  # noqa: BLE001 - not up yet
            return False

    @property
    def http_url(self) -> str:
        """Base URL of the worker's HTTP face (http.port on loopback)."""
        return f"http://127.0.0.1:{self.http_port}"

    def http_get(self, path: str, **kwargs):
        """GET ``path`` on the worker's HTTP face (httpx, a real request over loopback)."""
        import httpx

        return httpx.get(self.http_url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        response = self.http_get("/metrics")
        response.raise_for_status()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(response.text) for sample in family.samples}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the worker and wait; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            if self.launcher and sig != signal.SIGKILL:
                os.kill(self.worker_pid(), sig)  # a launcher (unshare) does not pass signals on
            else:
                self.process.send_signal(sig)    # SIGKILL: unshare --kill-child takes the worker with it
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    def worker_pid(self) -> int:
        """The serve process's pid (under a launcher: the launcher's child)."""
        assert self.process is not None
        if not self.launcher:
            return self.process.pid
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look for the child by its parent pid
            children = [stat.parent.name for stat in Path("/proc").glob("[0-9]*/stat")
                        if _parent_pid(stat) == self.process.pid]
        return int(children[0]) if children else self.process.pid

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run another cxr-worker subcommand against this worker's configuration."""
        return subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=120)

    def db_rows(self, sql: str, *params) -> list[tuple]:
        """Raw SQL rows from this worker's database (SQLite ``?`` placeholders; on ``database_url``
        they are bound as :p0, :p1 ... through SQLAlchemy)."""
        if self.database_url is None:
            return db_rows(self.data_dir, sql, *params)
        return url_rows(self.database_url, sql, *params)

    def results(self) -> list[dict]:
        """Result rows as `cxr-worker results --json` prints them (same code, read in-process)."""
        from worker.store.db import Database
        from worker.store.overview import result_rows

        db = Database(self.database_url or f"sqlite:///{self.data_dir / 'worker.db'}", create=False)
        try:
            return json.loads(json.dumps(result_rows(db)))
        finally:
            db.dispose()

    def status(self) -> dict:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker died waiting for {what}:\n{self.log()}")
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass


class StoreSCP:
    """DCMTK storescp writing received files into a directory (a destination for SRs)."""

    def __init__(self, out_dir: Path, *, port: int | None = None, ae_title: str = "DEST",
                 options: tuple[str, ...] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.options = tuple(options)  # extra storescp options, e.g. ("+tls", key, cert, "+cf", ca)
        self.port = port or free_port()
        self.http_port = free_port()  # the HTTP face (/healthz, /readyz, /metrics, pages) on loopback
        self.ae_title = ae_title
        self.process: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.out_dir),
                                         "+xa", *self.options, str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def files(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out_dir.iterdir()) if p.is_file()]

    def destination(self, name: str = "dest") -> dict:
        return {"name": name, "host": "127.0.0.1", "port": self.port, "ae_title": self.ae_title}

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def storescu(port: int, *files: Path, aec: str = "CXR_WORKER", options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", "TEST_SCU", "-aec", aec, *options, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def wait_files(directory: Path, count: int, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []
        if len(files) >= count:
            return files
        time.sleep(0.2)
    raise AssertionError(f"expected {count} files in {directory}, found "
                         f"{len(list(directory.iterdir())) if directory.exists() else 0}")


def which(name: str) -> str | None:
    return shutil.which(name)
