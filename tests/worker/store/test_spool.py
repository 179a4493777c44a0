"""Several workers on one data directory: each worker's own locked incoming/<owner>/, and a start-up
clean-up that removes only what workers that are gone left behind (real processes hold the locks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from worker.store.db import HOST
from worker.store.spool import LOCK_NAME, Spool

HOLD = """
import sys, time
from worker.store.spool import Spool
Spool(sys.argv[1]).take_incoming(sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def _aged(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_clean_incoming_removes_only_what_dead_workers_left(tmp_path):
    data = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(data), f"{HOST}:99999999:live"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "locked"
        me = Spool(data)
        # a worker of this host that died (SIGKILL: its lock is free, its pid gone)
        gone = Spool(data)
        gone.take_incoming(f"{HOST}:{dead.pid}:gone")
        (gone.incoming / "partial.dcm").write_bytes(b"x")
        gone_folder = gone.incoming
        os.close(gone._lock_fd)  # what the kernel does when that process dies
        # a worker of another host (lock free, pid meaningless here): only its old files go
        other = Spool(data)
        other.take_incoming("elsewhere~x:1:other")
        (other.incoming / "fresh.dcm").write_bytes(b"x")
        (other.incoming / "old.dcm").write_bytes(b"x")
        _aged(other.incoming / "old.dcm", 3600)
        other_folder = other.incoming
        os.close(other._lock_fd)
        # the live worker's folder: even an old file stays
        [live_folder] = [p for p in (data / "incoming").iterdir() if p.name.endswith("live")]
        (live_folder / "slow.dcm").write_bytes(b"x")
        _aged(live_folder / "slow.dcm", 3600)
        # the layout before per-worker folders
        (data / "incoming" / "legacy.dcm").write_bytes(b"x")
        _aged(data / "incoming" / "legacy.dcm", 3600)

        me.take_incoming(f"{HOST}:{os.getpid()}:me")
        assert len(me.live_workers()) == 1 and me.live_workers()[0].endswith(":live")
        assert me.clean_incoming() == 3                      # gone's partial, other's old file, legacy
        assert not gone_folder.exists()
        assert sorted(p.name for p in other_folder.iterdir()) == [LOCK_NAME, "fresh.dcm"]
        assert (live_folder / "slow.dcm").exists()
        assert not (data / "incoming" / "legacy.dcm").exists()
        assert me.check_filesystem(require_hard_links=True) is True
        me.release_incoming()
        assert not any(p.name.endswith("me") for p in (data / "incoming").iterdir())
    finally:
        live.kill()
        live.wait()


def test_check_filesystem_without_hard_links_into_spool(tmp_path):
    """spool/ on another filesystem (tmpfs at /dev/shm): one worker copies instead (False, a WARNING);
    workers that share data_dir are refused with the step named."""
    import shutil
    from pathlib import Path

    import pytest

    from worker.errors import SettingsError

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to put spool/ on")
    elsewhere = shm / f"cxr-spool-check-{os.getpid()}"
    elsewhere.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "spool").symlink_to(elsewhere)
    try:
        spool = Spool(tmp_path / "data")
        spool.take_incoming(f"{HOST}:{os.getpid()}:check")
        assert spool.check_filesystem(require_hard_links=False) is False
        with pytest.raises(SettingsError, match=r"storage.data_dir: .*hard-linking incoming/ into spool/ failed"):
            spool.check_filesystem(require_hard_links=True)
        assert not [p for p in elsewhere.iterdir()] and [p.name for p in spool.incoming.iterdir()] == [LOCK_NAME]
        spool.release_incoming()
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
