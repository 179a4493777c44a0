"""Idle TCP connections do not lock the listener out (issue 14, item 3).

A real `cxr-worker serve` with `network.max_associations = 4`. 24 plain sockets connect and never send
a byte (a port scan left open, a broken load balancer, a hostile peer). Meanwhile DCMTK echoscu and
storescu are served at once: a connection is handed to pynetdicom only with its whole A-ASSOCIATE-RQ
in hand, so the silent ones count against no limit. The worker closes each silent socket after
`network.association_request_timeout`, not after the 30 s ACSE timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from pydicom.uid import generate_uid

from testkit.env import dcmtk
from testkit.worker_process import WorkerProcess, wrap_jpeg

pytestmark = pytest.mark.dcmtk

IDLE = 24
MAX_ASSOCIATIONS = 4
REQUEST_TIMEOUT = 8.0  # network.association_request_timeout here (packaged default 5 s; longer for a busy CI)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    env = {"CXR_WORKER__NETWORK__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
           "CXR_WORKER__NETWORK__ASSOCIATION_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    with WorkerProcess(tmp_path_factory.mktemp("idle") / "data", env=env) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def _storescu(worker: WorkerProcess, path) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", "TEST_SCU", "-aec", worker.ae_title, "127.0.0.1",
                           str(worker.port), str(path)], capture_output=True, text=True, timeout=60)


def _closed_at(sock: socket.socket, limit: float) -> float | None:
    """monotonic time at which the worker closed ``sock`` (EOF or reset), None if still open at ``limit``."""
    while True:
        remaining = limit - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(1024)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return time.monotonic()
        if not data:
            return time.monotonic()
        raise AssertionError(f"the worker sent {data!r} to a connection that sent nothing")


def test_idle_connections_neither_lock_out_senders_nor_stay_open(worker, kaggle_jpegs, tmp_path):
    study_uid = generate_uid()
    dcm = wrap_jpeg(kaggle_jpegs["NORMAL"][0], tmp_path / "a.dcm", study_uid=study_uid)
    warm = wrap_jpeg(kaggle_jpegs["NORMAL"][1], tmp_path / "warm.dcm", study_uid=generate_uid())
    # The worker's first association and first C-STORE (imports, database) are not what is measured.
    assert _storescu(worker, warm).returncode == 0
    idle, connected = [], []
    try:
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", worker.port)))
            connected.append(time.monotonic())
        time.sleep(0.3)  # every idle socket accepted and waiting in the worker
        started = time.monotonic()
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "TEST_SCU", "-aec", worker.ae_title, "127.0.0.1",
                               str(worker.port)], capture_output=True, text=True, timeout=60)
        store = _storescu(worker, dcm)
        served_at = time.monotonic()
        served = served_at - started
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert store.returncode == 0, store.stdout + store.stderr
        assert "Local limit exceeded" not in echo.stdout + echo.stderr + store.stdout + store.stderr
        assert served < REQUEST_TIMEOUT - 2.0, f"echoscu + storescu took {served:.1f} s"
        assert worker.db_rows("select count(*) from instances where study_uid=?", study_uid) == [(1,)]

        # Each idle socket closed by the worker after the short timeout, not the 30 s ACSE timeout.
        closed = [_closed_at(sock, at + REQUEST_TIMEOUT + 5.0) for sock, at in zip(idle, connected)]
        assert all(t is not None for t in closed), \
            f"{sum(t is None for t in closed)} of {IDLE} idle sockets still open after {REQUEST_TIMEOUT + 5:.0f} s"
        # Served while all 24 idle sockets were still held: the worker closed none before.
        assert served_at < min(closed), f"an idle socket was closed {served_at - min(closed):.1f} s before"
        after = sorted(t - at for t, at in zip(closed, connected))
        assert after[0] >= REQUEST_TIMEOUT - 0.5, f"closed too early: {after[0]:.1f} s after connecting"
    finally:
        for sock in idle:
            sock.close()
    log = worker.wait_for(lambda: worker.log() if "no A-ASSOCIATE-RQ within" in worker.log() else None,
                          what="idle connections logged")
    assert "network.association_request_timeout" in log
    assert "Rejecting Association" not in log and "Local limit exceeded" not in log
    assert worker.echo()  # the listener is still there
