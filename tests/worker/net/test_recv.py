"""worker/net/_pynetdicom/recv.py keeps pynetdicom's AssociationSocket.recv contract (real sockets, no mocks)."""

from __future__ import annotations

import os
import socket
import threading

from pynetdicom.transport import AssociationSocket

from worker.net._pynetdicom import recv as fastrecv
class _Holder:
    """What _recv needs from an AssociationSocket: its ``socket``."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def _send_slowly(sock: socket.socket, data: bytes, piece: int, close: bool) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), piece):
            sock.sendall(data[start:start + piece])
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_reads_exactly_what_was_asked_across_many_segments() -> None:
    left, right = socket.socketpair()
    payload = os.urandom(3 * 131072 + 17)
    with left, right:
        sender = _send_slowly(left, payload, 1000, close=False)
        holder = _Holder(right)
        first = fastrecv._recv(holder, 6)
        rest = fastrecv._recv(holder, len(payload) - 6)
        sender.join()
    assert isinstance(first, bytearray) and isinstance(rest, bytearray)
    assert bytes(first + rest) == payload


def test_short_read_when_the_peer_closes_like_pynetdicom() -> None:
    results = []
    for recv in (fastrecv._recv, fastrecv._original_recv):
        left, right = socket.socketpair()
        with left, right:
            _send_slowly(left, b"x" * 5000, 700, close=True).join()
            results.append(bytes(recv(_Holder(right), 10000)))
    assert results[0] == results[1] == b"x" * 5000


def test_patch_and_unpatch_swap_the_method() -> None:
    previous = AssociationSocket.recv
    fastrecv.patch()
    try:
        assert AssociationSocket.recv is fastrecv._recv
        fastrecv.unpatch()
        assert AssociationSocket.recv is fastrecv._original_recv
    finally:
        AssociationSocket.recv = previous  # as the process had it (install() may have run before)
