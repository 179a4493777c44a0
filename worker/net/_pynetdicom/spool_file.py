"""The file pynetdicom spools an arriving C-STORE data set into, made safe for a full or broken disk.

pynetdicom (STORE_RECV_CHUNKED_DATASET) writes each P-DATA fragment into a NamedTemporaryFile in
``incoming/`` while the data set arrives. When that write fails (ENOSPC, EIO, the directory gone),
the exception escapes into pynetdicom's DUL reactor, which A-ABORTs the association: the sender
gets no status at all, and the partial file stays behind, filling the disk further.

``IncomingFile`` stands in for that NamedTemporaryFile: the first failed write is remembered, the
partial file is removed at once (space is given back), later fragments are discarded, and the
message completes normally. The C-STORE handler then asks ``failure(path)`` and answers 0xA700
(Out of Resources) with the reason in the log; the listener keeps serving.

While the data set arrives, ``IncomingFile`` also asks the kernel to start writing it to disk
every ``storage.writeback_bytes`` (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, a hint that
does not wait): the fsync before Success then finds little left to write (a 10 MB image: ~9 ms ->
~3 ms). Durability still rests on that fsync alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable

_failures: dict[str, str] = {}
_lock = threading.Lock()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages in the range, do not wait
_writeback_bytes = 0        # set by patch(); 0 = no early writeback
_directory: str | None = None  # set by patch(): where data sets are spooled (None: the temp dir)
_refuse: Callable[[], str | None] | None = None  # set by patch(): why nothing may be written now, or None

#: Failure codes ``failure()`` returns (the receiver's metrics and log reasons).
SPOOL_WRITE_FAILED = "spool_write_failed"
REFUSED = "disk_below_watermark"


def _load_sync_file_range():
    """libc's sync_file_range (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class IncomingFile:
    """A NamedTemporaryFile(delete=False, mode="wb") whose write errors are recorded, not raised.

    When ``_refuse()`` gives a reason as the data set begins to arrive (the disk is below
    storage.min_free_bytes), no file is created at all: every fragment is discarded and the handler
    answers 0xA700 (``failure()`` returns ``REFUSED`` with the reason): nothing is written."""

    def __init__(self, *args, **kwargs) -> None:
        self.error: str | None = None
        self.file = self  # pynetdicom calls ``.file.flush()`` after every fragment
        self._written = 0   # bytes written so far
        self._queued = 0    # bytes whose writeback was started
        why = _refuse() if _refuse is not None else None
        if why:
            self._handle = None
            self.name = os.path.join(_directory or tempfile.gettempdir(), f"refused-{uuid.uuid4().hex}.dcm")
            self.error = why
            with _lock:
                _failures[self.name] = (REFUSED, why)
            return
        try:
            kwargs.setdefault("dir", _directory)
            self._handle = tempfile.NamedTemporaryFile(*args, **kwargs)
            self.name = self._handle.name
        except OSError as exc:  # incoming/ missing, unwritable, or no inode left
            self._handle = None
            self.name = os.path.join(_directory or tempfile.gettempdir(), f"unwritable-{uuid.uuid4().hex}.dcm")
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            with _lock:
                _failures[self.name] = (SPOOL_WRITE_FAILED, self.error)
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass
            try:
                os.unlink(self.name)  # give the space back now
            except OSError:
                pass

    def write(self, data) -> int:
        if self._handle is not None:
            try:
                written = self._handle.write(data)
                self._written += written
                return written
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._handle is not None:
            try:
                self._handle.flush()
            except OSError as exc:
                self._fail(exc)
                return
            if _writeback_bytes and _sync_file_range and self._written - self._queued >= _writeback_bytes:
                # A hint only (errors ignored): the fsync before Success reports any I/O error.
                _sync_file_range(self._handle.fileno(), self._queued, self._written - self._queued,
                                 _SYNC_FILE_RANGE_WRITE)
                self._queued = self._written

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as exc:
                self._fail(exc)


def failure(path) -> tuple[str, str] | None:
    """(code, message): why the data set spooled at ``path`` could not be written or was not
    (``SPOOL_WRITE_FAILED``, ``REFUSED``), forgotten once asked; or None."""
    with _lock:
        return _failures.pop(str(path), None)


def patch(writeback_bytes: int = 0, directory: str | os.PathLike | None = None,
          refuse: Callable[[], str | None] | None = None) -> None:
    """Make pynetdicom spool received data sets through IncomingFile (idempotent; see install()).

    ``writeback_bytes`` > 0: start the kernel's writeback every that many received bytes.
    ``directory``: where the data sets are spooled (the spool's incoming/, on the same filesystem as
    the spool so adopting a file is a link). The process-wide temp dir is left alone.
    ``refuse``: asked as each data set begins; a reason (str) means nothing of it is written.
    """
    global _writeback_bytes, _directory, _refuse
    from pynetdicom import dimse_messages

    _writeback_bytes = max(0, int(writeback_bytes))
    _directory = os.fspath(directory) if directory is not None else None
    _refuse = refuse

    if not hasattr(dimse_messages, "NamedTemporaryFile"):
        raise RuntimeError("pynetdicom.dimse_messages.NamedTemporaryFile not found: pynetdicom changed")
    dimse_messages.NamedTemporaryFile = IncomingFile
