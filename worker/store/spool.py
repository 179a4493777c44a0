"""Durable files: the spool of received instances and the SR files, written atomically.

Layout under the data directory (directories 0700, files 0600):
    incoming/<owner>/          pynetdicom writes each received data set here while it arrives; one
                               folder per running worker (``take_incoming``), its ``.lock`` file
                               locked (POSIX ``lockf``) for as long as that worker lives
    spool/<study>/<sop>.dcm    received instances, exactly the bytes that were sent (no re-encoding)
    sr/<study>/<sop>.dcm       the SRs the worker wrote, and the heatmap objects they reference
                               (Segmentation, key image), each named by its own SOP Instance UID
    heatmaps/<study>/<sop>.jpg overlays shown on the study page, named by the source image
    worker.db                  the default SQLite database

Several workers may share one data directory (with one PostgreSQL database): each receives into
its own ``incoming/<owner>/``; at start-up a worker removes only the folders of workers that are
gone (lock free, and the owner a dead process on this host, or nothing in it touched for 10
minutes), never a live worker's partial receptions. ``check_filesystem`` proves at start-up that the
directory gives what the receive path relies on (docs/deployment.md, "What data_dir requires").
The durable-write primitives and the object paths, which need no database, are files.py's (the
decode processes write the heatmap objects with them).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingsError
from .db import owner_is_dead_here
from .files import (  # noqa: F401 - the durable-file primitives, re-exported for the receive path
    FSYNC_THREADS, ObjectPaths, fsync_dir, fsync_file, fsync_later, fsync_together, private_dir, safe_name,
    write_files,
)

log = logging.getLogger("cxr_worker.spool")

#: The file in a worker's incoming/<owner>/ that it keeps locked while it lives (its owner string inside).
LOCK_NAME = ".lock"
#: A worker's incoming folder whose files and folder are all older than this is a dead worker's, even
#: where its lock cannot tell (another host on a filesystem whose locks are local only).
STALE_INCOMING_SECONDS = 600.0


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

    def refusal(self) -> str | None:
        """Why nothing may be written now (below the watermark), or None: asked as each received data
        set begins to arrive (worker/net/_pynetdicom/spool_file.py writes nothing of it then)."""
        low = self.below()
        if low is None:
            return None
        return f"free space {low.free_bytes} below storage.min_free_bytes {low.min_free_bytes}"


class Spool:
    """Paths and atomic moves under the data directory."""

    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self.root = private_dir(Path(data_dir))
        self.incoming_root = private_dir(self.root / "incoming")
        #: Where received data sets are spooled: incoming/ itself until take_incoming gives this worker its own.
        self.incoming = self.incoming_root
        self.spool = private_dir(self.root / "spool")
        self.sr = private_dir(self.root / "sr")
        self.heatmaps = self.root / "heatmaps"  # <study>/<source sop>.jpg overlays (the scorer writes them)
        self.paths = ObjectPaths(self.sr, self.heatmaps)
        self.watermark = DiskWatermark(self.root, min_free_bytes)
        self._lock_fd: int | None = None

    # -- several workers on one data directory ------------------------------------------------------------
    def take_incoming(self, owner: str) -> Path:
        """Give this worker its own ``incoming/<owner>/`` and lock it for the life of the process (the
        kernel, or the NFS server, releases the lock when the process dies, SIGKILL included).
        Raises SettingsError naming storage.data_dir when the filesystem cannot lock files."""
        folder = private_dir(self.incoming_root / re.sub(r"[^A-Za-z0-9._~-]", "_", owner))
        fd = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # blocking: another worker's start-up check holds it a moment at most
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise SettingsError(f"storage.data_dir: {self.root}: cannot lock a file there ({exc}); workers "
                                "sharing data_dir need working file locks (NFS: v4, or v3 with lockd, not "
                                "'nolock'; docs/deployment.md)") from None
        self._lock_fd, self.incoming = fd, folder
        return folder

    def previews(self) -> Path:
        """This worker's folder for the decode processes' previews (worker/scoring/prepare.keep_preview):
        inside its own incoming folder, so that it goes with it (release_incoming, clean_incoming)."""
        return private_dir(self.incoming / "previews")

    def release_incoming(self) -> None:
        """On a clean stop: remove this worker's incoming folder (whatever is left in it was never
        answered Success) and drop its lock."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.incoming, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd, self.incoming = None, self.incoming_root

    def _worker_folders(self) -> list[Path]:
        """The other workers' incoming folders (never this worker's own: closing a descriptor of our
        own lock file would drop our lock)."""
        return [p for p in self.incoming_root.iterdir() if p.is_dir() and p != self.incoming]

    def live_workers(self) -> list[str]:
        """Owners of the other workers running on this data directory now (their lock is held)."""
        live = []
        for folder in self._worker_folders():
            try:
                fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
            except OSError:
                continue
            try:
                # a shared lock, taken and dropped at once (close): a live worker's exclusive lock refuses it
                # (read-only descriptor, so the probe never needs write access to another's file)
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                live.append(os.pread(fd, 256, 0).decode(errors="replace") or folder.name)
            finally:
                os.close(fd)
        return live

    def check_filesystem(self, require_hard_links: bool) -> bool:
        """Prove, in this worker's incoming folder and in spool/, what the receive path relies on: a
        file written and fsynced, hard-linked into spool/ (same inode, link count 2; linking onto an
        existing name refused), a rename over a name atomic, directories fsynced. Returns whether hard
        links work; raises SettingsError naming storage.data_dir when any step fails (hard links only
        when ``require_hard_links``: several workers; one worker copies instead)."""
        tag = re.sub(r"[^A-Za-z0-9]", "", self.incoming.name)[-24:] or "check"
        probe, linked, other = self.incoming / ".fscheck", self.spool / f".fscheck-{tag}", self.spool / f".fscheck2-{tag}"
        step = "writing and fsyncing a file"
        links = True
        try:
            for path in (probe, linked, other):
                path.unlink(missing_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"cxr-worker data_dir check")
                handle.flush()
                os.fsync(handle.fileno())
            step = "hard-linking incoming/ into spool/"
            try:
                os.link(probe, linked)
            except OSError as exc:
                if require_hard_links:
                    raise
                links = False
                shutil.copyfile(probe, linked)  # what adopt() does then
                log.warning("storage.data_dir %s: no hard links from incoming/ to spool/ (%s); received files "
                            "are copied (slower; several workers need hard links)", self.root, exc)
            if links:
                if not (os.stat(probe).st_ino == os.stat(linked).st_ino and os.stat(probe).st_nlink == 2):
                    raise OSError(errno.EIO, "the link is not the same file with link count 2")
                step = "linking onto an existing name (must be refused)"
                try:
                    os.link(probe, linked)
                except FileExistsError:
                    pass
                else:
                    raise OSError(errno.EIO, "an existing name was replaced")
            step = "renaming a file over another atomically"
            other.write_bytes(b"replaced")
            os.replace(other, linked)
            if linked.read_bytes() != b"replaced" or other.exists():
                raise OSError(errno.EIO, "the rename did not replace the name")
            if links and os.stat(probe).st_nlink != 1:
                raise OSError(errno.EIO, "link count not 1 after the rename")
            step = "fsyncing directories"
            fsync_together([], [self.incoming, self.spool])
        except OSError as exc:
            raise SettingsError(f"storage.data_dir: {self.root}: {step} failed ({exc}); see docs/deployment.md, "
                                "'What data_dir requires'") from None
        finally:
            for path in (probe, linked, other):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        return links

    def instance_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.spool / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def sr_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.paths.sr_path(study_uid, sop_uid)

    def heatmap_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.paths.heatmap_path(study_uid, sop_uid)

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

    def write_files(self, files: Sequence[tuple[Path, bytes]]) -> list[Path]:
        """``write_bytes`` for several files at once (files.write_files: one fsync batch)."""
        return write_files(files)

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

    def clean_incoming(self, min_age_seconds: float = STALE_INCOMING_SECONDS) -> int:
        """Remove partial receptions left by a crash (never answered Success, so the sender retried);
        returns how many files. Never another live worker's:

        - a worker's folder whose lock is held: its worker lives, left alone;
        - lock free and its owner a process of this host that is gone (store/db.owner_is_dead_here), or
          nothing in it touched for ``min_age_seconds``: removed with its files;
        - lock free otherwise (another host; on a filesystem whose locks are not shared): only its
          files untouched for ``min_age_seconds``;
        - files directly in incoming/ (the layout before per-worker folders): those untouched that long.
        """
        removed = 0
        cutoff = time.time() - min_age_seconds
        for leftover in self.incoming_root.iterdir():
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)
                removed += 1
        for folder in self._worker_folders():
            removed += self._clean_folder(folder, cutoff)
        return removed

    def _clean_folder(self, folder: Path, cutoff: float) -> int:
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # a worker creating it this moment, or a leftover: by age only
        try:
            if fd is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return 0  # its worker is alive
            owner = os.pread(fd, 256, 0).decode(errors="replace") if fd is not None else ""
            files = [p for p in folder.iterdir() if p.name != LOCK_NAME and p.is_file()]
            stale = folder.stat().st_mtime < cutoff and all(p.stat().st_mtime < cutoff for p in files)
            if fd is not None and (owner_is_dead_here(owner) or stale):
                shutil.rmtree(folder, ignore_errors=True)
                return len(files)
            old = [p for p in files if p.stat().st_mtime < cutoff]
            for p in old:
                p.unlink(missing_ok=True)
            return len(old)
        except OSError:
            return 0
        finally:
            if fd is not None:
                os.close(fd)
