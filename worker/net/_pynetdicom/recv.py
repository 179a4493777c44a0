"""Faster socket reads for pynetdicom: whole PDUs with ``recv_into`` instead of 4 KiB ``recv`` calls.

pynetdicom 3.0 ``AssociationSocket.recv(n)`` reads at most 4096 bytes per ``socket.recv`` call and
appends each piece to a growing bytearray: a 10 MB image is ~2,500 calls and as many copies,
a third of a bare pynetdicom receiver's CPU (py-spy, benchmarks/bare_scp.py, JPEG Lossless films).
``patch()`` (called by ``install()``) replaces it with a loop that reads straight into one
preallocated buffer, as many bytes as the kernel has, with the same contract: returns the ``n``
bytes asked for, or what was read before the peer closed the connection (a short result means
"connection broken").
"""

from __future__ import annotations

import socket
from typing import cast

from pynetdicom.transport import AssociationSocket

_original_recv = AssociationSocket.recv


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from the socket (fewer only when the peer closed it), blocking like the original."""
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:  # connection broken: return what we have, as pynetdicom does
                break
            nr_read += count
    finally:
        view.release()
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


def patch() -> None:
    """Use the fast read for every pynetdicom association of this process (idempotent)."""
    AssociationSocket.recv = _recv  # type: ignore[method-assign]


def unpatch() -> None:
    """Back to pynetdicom's own read (tests, benchmarks)."""
    AssociationSocket.recv = _original_recv  # type: ignore[method-assign]
