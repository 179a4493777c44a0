"""The worker's touches of pynetdicom internals, in one private package, switched on by ``install()``.

Each touch below was written against, and tested with, pynetdicom 3.0.4 (``TESTED_WITH``). They rely on
names and behaviour that pynetdicom does not promise to keep, so ``install()`` refuses any other minor
version at start-up instead of letting the worker fail later, one association at a time.

Process-wide, set by ``install()`` (nothing changes them before it is called):

- ``_config.STORE_RECV_CHUNKED_DATASET = True`` (documented, but a global): each received data set
  is spooled to a file as it arrives, never decoded, so the listener hands the bytes as sent to
  worker/receiver.py and an image of any size costs no memory.
- ``_config.STORE_SEND_CHUNKED_DATASET = True`` (documented, but a global): ``send_c_store(path)``
  sends the data set as stored in the file, without decoding and re-encoding it (the SR goes out as
  written). It then needs an accepted context with the file's own transfer syntax; worker/net/scu.py
  checks that first and decodes only a file the peer cannot take as stored.
- ``_config.LOG_REQUEST_IDENTIFIERS = LOG_RESPONSE_IDENTIFIERS = False``: pynetdicom would log
  C-FIND/GET/MOVE identifiers, i.e. patient data, at INFO.
- ``dimse_messages.NamedTemporaryFile`` (a module-level import there) is replaced by
  ``spool_file.IncomingFile``: received data sets are spooled into the spool's ``incoming/`` (same
  filesystem, so adopting one is a link) without changing ``tempfile.tempdir`` for the process; a
  failed write (disk full, I/O error) becomes a 0xA700 answer instead of an A-ABORT from the DUL
  reactor; the kernel's writeback starts while the data set arrives (spool_file.py).
- ``transport.AssociationSocket.recv`` is replaced by ``recv._recv``: whole PDUs with ``recv_into``
  instead of 4 KiB ``recv`` calls and copies (a third of a bare receiver's CPU, recv.py).

Per object, where they are used (nothing to install):

- reactor.py: the requestor association's ``_reactor_checkpoint``, ``_is_paused``, ``_dul_ready``,
  ``_kill``, ``dimse.get_msg``, ``dul.peek_next_pdu`` and ``dul._idle_timer``: without the guard the
  reactor thread can take our C-STORE-RSP off the queue under GIL contention (the send then waits the
  DIMSE timeout and aborts; benchmarks/scu_race.py), and an idle kept association polls every 1 ms.
- server.py: ``NoDelayServer`` replaces ``AssociationServer.get_request`` (TCP_NODELAY, the TLS
  handshake moved off the accept thread) and wraps ``ThreadedAssociationServer.process_request_thread``
  so that a connection becomes an Association (and counts against ``maximum_associations``, which
  acse.py checks against every acceptor, also one still waiting in Sta2) only once its whole
  A-ASSOCIATE-RQ has arrived (``MSG_PEEK``), within ``network.association_request_timeout``;
  ``ae._servers`` registers it, as ``AE.start_server`` does for the server class it hard-codes.
  ``close_unestablished`` reads ``assoc.dul.state_machine.current_state``, shuts down
  ``assoc.dul.socket.socket`` and puts ``None`` on ``dul.to_user_queue`` to close an acceptor in
  Sta1/Sta2, where ``abort()`` (Evt15) is an invalid event that kills the reactor thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pynetdicom
from pynetdicom import _config

from ...errors import UnsupportedDependency
from . import recv, spool_file

TESTED_WITH = "3.0.4"
"""The pynetdicom release these touches were written and tested against."""
SUPPORTED_MINORS = ("3.0",)
"""pynetdicom minor versions ``install()`` accepts."""
REQUIREMENT = "pynetdicom>=3.0.4,<3.1"
"""As pinned in pyproject.toml."""


def check_version(installed: str, supported: tuple[str, ...] = SUPPORTED_MINORS) -> None:
    """Raise UnsupportedDependency unless ``installed`` (a pynetdicom version) is of a ``supported`` minor."""
    match = re.match(r"(\d+)\.(\d+)(?!\d)", installed.strip())
    if match is None or f"{match[1]}.{match[2]}" not in supported:
        wanted = ", ".join(f"{minor}.x" for minor in supported)
        raise UnsupportedDependency(
            f"pynetdicom {installed} is installed, but the worker supports pynetdicom {wanted} only "
            f"(its touches of pynetdicom internals, worker/net/_pynetdicom, were tested with {TESTED_WITH}); "
            f"install '{REQUIREMENT}'")


def install(*, writeback_bytes: int = 0, incoming_dir: str | os.PathLike | None = None,
            refuse: Callable[[], str | None] | None = None) -> None:
    """Check pynetdicom's version, then make the process-wide changes above (idempotent).

    ``incoming_dir``: where received data sets are spooled (the spool's ``incoming/``), and
    ``writeback_bytes`` > 0: start the kernel's writeback every that many received bytes
    (``storage.writeback_bytes``). A process that only sends (``cxr-worker send``) passes neither.
    ``refuse``: asked as each received data set begins; a reason means none of it is written and
    the C-STORE is answered 0xA700 (the disk watermark, storage.min_free_bytes).
    """
    check_version(pynetdicom.__version__)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    spool_file.patch(writeback_bytes, incoming_dir, refuse)
    recv.patch()
