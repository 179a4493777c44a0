"""The worker's one error hierarchy: every error it raises on purpose derives from ``WorkerError``.

The network layer maps the receive errors to DICOM statuses in one place (worker/net/status.py);
the CLI maps ``SettingsError`` and ``UnsupportedDependency`` to exit status 2.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the errors this package raises on purpose."""


class SettingsError(WorkerError, ValueError):
    """The configuration is invalid; the message names the key."""


class UnsupportedDependency(WorkerError):
    """An installed library is outside the versions the worker was tested with (checked at start-up)."""


class ReceiveError(WorkerError):
    """A received instance was not stored; the sender is told so by its C-STORE status.

    ``reason``: a short stable code (the ``reason`` label of ``cxr_worker_instances_received_total``).
    """

    reason = "receive_error"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class Unreadable(ReceiveError):
    """The data set cannot be parsed (or lacks its identifying UIDs): kept in rejected/, never scored."""

    reason = "unreadable"


class NotDurable(ReceiveError):
    """The instance could not be made durable or recorded (disk, database): the sender should retry."""

    reason = "not_durable"


class DiskFull(NotDurable):
    """Free space on the spool's filesystem is below ``storage.min_free_bytes``: refused before
    anything is kept (0xA700, the sender retries later)."""

    reason = "disk_below_watermark"
