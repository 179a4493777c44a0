"""Durable files without the database: atomic, fsynced writes and the object paths under the data directory.

What the decode processes need to write the heatmap objects themselves (worker/heatmap/objects.py
make_all: the bytes go to disk where they were made, not through a pipe to the main process), and
what spool.py builds on. No SQLAlchemy here (pyproject [tool.importlinter]).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
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


def write_files(files: Sequence[tuple[Path, bytes]]) -> list[Path]:
    """Write each ``(final, data)`` atomically and durably: each to a temp file beside it, all fsynced
    together (one journal commit), renamed into place, their directories fsynced (new ones included)."""
    staged: list[tuple[str, Path]] = []
    dirs: dict[Path, None] = {}
    try:
        for final, data in files:
            if not final.parent.exists():
                private_dir(final.parent)
                dirs[final.parent.parent] = None
            dirs[final.parent] = None
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
            staged.append((name, final))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        fsync_together([Path(name) for name, _ in staged])
        for name, final in staged:
            os.replace(name, final)
    except BaseException:
        for name, _ in staged:
            Path(name).unlink(missing_ok=True)
        raise
    fsync_together([], list(dirs))
    return [final for _, final in staged]


@dataclass(frozen=True)
class ObjectPaths:
    """Where the worker's own objects lie under the data directory (picklable: the decode processes
    get it): ``sr/<study>/<sop>.dcm`` (SRs and heatmap objects) and ``heatmaps/<study>/<sop>.jpg``
    (the page's overlays, named by the source image)."""

    sr: Path
    heatmaps: Path

    def sr_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.sr / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def heatmap_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.heatmaps / safe_name(study_uid) / f"{safe_name(sop_uid)}.jpg"

