"""Durable files: the spool of received instances and the SR files, written atomically.

Layout under the data directory (directories 0700, files 0600):
    incoming/                  pynetdicom writes each received data set here while it arrives
    spool/<study>/<sop>.dcm    received instances, exactly the bytes that were sent (no re-encoding)
    sr/<study>/<sop>.dcm       the SRs the worker wrote
    heatmaps/<study>/<sop>.png overlays shown on the study page, when present
    worker.db                  the default SQLite database
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")
#: Threads that issue fsyncs side by side (fsync_together): two per concurrent C-STORE and the SR writer.
FSYNC_THREADS = 8
_fsync_pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700; tighten an existing one we own."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except PermissionError:
        pass
    return path


def safe_name(uid: str) -> str:
    """A UID as a file name; anything that is not a plain UID is hashed (no path tricks)."""
    uid = (uid or "").strip().rstrip("\x00")
    if _UID_RE.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_later(path: Path) -> Future:
    """Start fsyncing ``path`` on the fsync threads; the future raises the OSError, if any.

    The C-STORE handler starts the received file's fsync first and parses its header meanwhile.
    """
    return _fsync_pool.submit(fsync_file, path)


def fsync_together(files: Sequence[Path], dirs: Sequence[Path] = (), started: Sequence[Future] = ()) -> None:
    """fsync ``files`` and ``dirs`` concurrently; returns when every one is durable (first error raised).

    Each fsync keeps its full guarantee; issued together, the kernel merges their journal commits and
    disk cache flushes (ext4 on virtio, file + two directories: ~7 ms one after another, ~0.5 ms together).
    ``started``: fsyncs already under way (fsync_later) to wait for as well.
    """
    jobs = [(fsync_file, p) for p in files] + [(fsync_dir, p) for p in dirs]
    futures = [*started, *(_fsync_pool.submit(fn, p) for fn, p in jobs[1:])]
    error: OSError | None = None
    if jobs:  # the first one on this thread
        try:
            jobs[0][0](jobs[0][1])
        except OSError as exc:
            error = exc
    for future in futures:  # wait for all, even after an error
        try:
            future.result()
        except OSError as exc:
            error = error or exc
    if error is not None:
        raise error


@dataclass(frozen=True)
class FreeSpace:
    """Free space of the data directory's filesystem against the watermark, when it was measured."""

    free_bytes: int
    min_free_bytes: int
    measured: float  # time.monotonic()

    @property
    def below_watermark(self) -> bool:
        return self.min_free_bytes > 0 and self.free_bytes < self.min_free_bytes


class DiskWatermark:
    """``storage.min_free_bytes`` on the filesystem of ``path``: statvfs at most once per ``max_age``
    seconds (the C-STORE path asks on every instance: a cached answer costs a lock and a clock read)."""

    def __init__(self, path: Path, min_free_bytes: int, max_age: float = 1.0) -> None:
        self.path = Path(path)
        self.min_free_bytes = int(min_free_bytes)
        self.max_age = max_age
        self._lock = threading.Lock()
        self._last: FreeSpace | None = None

    def measure(self) -> FreeSpace:
        """Free space now (statvfs: blocks available to unprivileged users), cached for ``max_age``."""
        now = time.monotonic()
        last = self._last
        if last is not None and now - last.measured < self.max_age:
            return last
        with self._lock:
            last = self._last
            if last is not None and now - last.measured < self.max_age:
                return last
            st = os.statvfs(self.path)
            self._last = FreeSpace(st.f_bavail * st.f_frsize, self.min_free_bytes, time.monotonic())
            return self._last

    def below(self) -> FreeSpace | None:
        """The measurement when free space is below the watermark, else None (always None when off)."""
        if self.min_free_bytes <= 0:
            return None
        space = self.measure()
        return space if space.below_watermark else None


class Spool:
    """Paths and atomic moves under the data directory."""

    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self.root = private_dir(Path(data_dir))
        self.incoming = private_dir(self.root / "incoming")
        self.spool = private_dir(self.root / "spool")
        self.sr = private_dir(self.root / "sr")
        self.heatmaps = self.root / "heatmaps"  # <study>/<sop>.png overlays (written by the heatmap issue)
        self.watermark = DiskWatermark(self.root, min_free_bytes)

    def instance_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.spool / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def sr_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.sr / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def heatmap_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.heatmaps / safe_name(study_uid) / f"{safe_name(sop_uid)}.png"

    def adopt(self, tmp: Path, final: Path, file_sync: Future | None = None) -> bool:
        """Move ``tmp`` to ``final`` without replacing an existing file; durable when it returns True.

        Returns False (leaving ``tmp`` in place) when ``final`` already exists.
        The names are made first, then the file, its directory and (when new) the spool directory
        are fsynced together (one merged journal commit and cache flush); ``file_sync`` is the
        file's own fsync when it was started already (fsync_later). A crash before they return
        leaves a file without a database row, which the sender's retry replaces (no Success was sent).
        """
        os.chmod(tmp, 0o600)
        parent = final.parent
        created = not parent.exists()
        private_dir(parent)
        try:
            os.link(tmp, final)          # atomic, and fails instead of overwriting
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            if final.exists():
                return False
            staged = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            shutil.copyfile(tmp, staged)  # other filesystem / no hard links: copy, fsync, rename
            fsync_file(staged)
            os.replace(staged, final)
        dirs = [parent, parent.parent] if created else [parent]
        if file_sync is not None:
            fsync_together([], dirs, started=[file_sync])
        else:
            fsync_together([final], dirs)
        tmp.unlink(missing_ok=True)
        return True

    def replace(self, tmp: Path, final: Path) -> None:
        """fsync ``tmp`` and atomically put it at ``final`` (replacing), fsync the directory."""
        os.chmod(tmp, 0o600)
        os.replace(tmp, final)
        fsync_together([final], [final.parent])

    def write_bytes(self, final: Path, data: bytes) -> Path:
        """Write ``data`` to ``final`` atomically (temp file in the same directory), durably (new
        directory entries included)."""
        created = not final.parent.exists()
        private_dir(final.parent)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(name, final)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        fsync_together([], [final.parent, final.parent.parent] if created else [final.parent])
        return final

    def clean_incoming(self, min_age_seconds: float = 600.0) -> int:
        """Remove partial receptions left by a crash (never answered Success, so the sender retried).

        Only files untouched for ``min_age_seconds``: another worker sharing the data directory may
        be receiving into this folder right now.
        """
        removed = 0
        cutoff = time.time() - min_age_seconds
        for leftover in self.incoming.iterdir():
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed
