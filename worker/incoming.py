"""The file pynetdicom spools an arriving C-STORE data set into, made safe for a full or broken disk.

pynetdicom (STORE_RECV_CHUNKED_DATASET) writes each P-DATA fragment into a NamedTemporaryFile in
``incoming/`` while the data set arrives. When that write fails (ENOSPC, EIO, the directory gone),
the exception escapes into pynetdicom's DUL reactor, which A-ABORTs the association: the sender
gets no status at all, and the partial file stays behind, filling the disk further.

``IncomingFile`` stands in for that NamedTemporaryFile: the first failed write is remembered, the
partial file is removed at once (space is given back), later fragments are discarded, and the
message completes normally. The C-STORE handler then asks ``failure(path)`` and answers 0xA700
(Out of Resources) with the reason in the log; the listener keeps serving.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid

_failures: dict[str, str] = {}
_lock = threading.Lock()


class IncomingFile:
    """A NamedTemporaryFile(delete=False, mode="wb") whose write errors are recorded, not raised."""

    def __init__(self, *args, **kwargs) -> None:
        self.error: str | None = None
        self.file = self  # pynetdicom calls ``.file.flush()`` after every fragment
        try:
            self._handle = tempfile.NamedTemporaryFile(*args, **kwargs)
            self.name = self._handle.name
        except OSError as exc:  # incoming/ missing, unwritable, or no inode left
            self._handle = None
            self.name = os.path.join(tempfile.gettempdir(), f"unwritable-{uuid.uuid4().hex}.dcm")
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            with _lock:
                _failures[self.name] = self.error
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
                return self._handle.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._handle is not None:
            try:
                self._handle.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as exc:
                self._fail(exc)


def failure(path) -> str | None:
    """Why the data set spooled at ``path`` could not be written (forgotten once asked), or None."""
    with _lock:
        return _failures.pop(str(path), None)


def install() -> None:
    """Make pynetdicom spool received data sets through IncomingFile (idempotent)."""
    from pynetdicom import dimse_messages

    if not hasattr(dimse_messages, "NamedTemporaryFile"):
        raise RuntimeError("pynetdicom.dimse_messages.NamedTemporaryFile not found: pynetdicom changed")
    dimse_messages.NamedTemporaryFile = IncomingFile
