"""The listener's association server: pynetdicom's threaded server, TCP_NODELAY, TLS off the accept
thread, and no Association before the peer has sent its whole A-ASSOCIATE-RQ.

pynetdicom 3.0.4: ``AssociationServer.get_request`` accepts and, with an SSL context, wraps the socket
with the handshake done at once, on the accept thread; ``NoDelayServer`` replaces it (so it relies on
that method doing nothing else) and does the handshake in the connection's own thread
(``ThreadingMixIn.process_request_thread``, which then calls pynetdicom's, which creates the
acceptor ``Association``).
``AE.start_server(block=False)`` hard-codes its server class, so ``make_server`` builds ours with
``AE.make_server`` and registers it in ``ae._servers`` as ``start_server`` does: the server's
``shutdown()`` removes itself from that list, and ``AE.shutdown()`` stops what it lists.

Pending connections. pynetdicom creates the acceptor Association as soon as a TCP connection is
accepted, and its "local limit exceeded" check (acse.py) counts every acceptor Association, also one
still in Sta2 waiting for an A-ASSOCIATE-RQ for ``acse_timeout``. So 16 sockets that connect and
send nothing used to fill ``network.max_associations`` for 30 s and every real sender was rejected.
Now a connection is *pending* until its whole A-ASSOCIATE-RQ PDU is in the socket's receive buffer
(``MSG_PEEK``, nothing consumed; over TLS: handshake done and the first application bytes
readable); only then is it handed to pynetdicom. A pending connection:

- does not count against ``max_associations`` (no Association exists);
- gets ``network.association_request_timeout`` seconds (a few) for that, then it is closed;
- is one of at most ``network.max_pending_connections``; a new connection beyond that closes the
  *oldest* pending one, so a flood of idle sockets cannot keep a new sender out: it only shortens
  how long each idle socket is kept. There is no per-peer limit: modalities behind one NAT or a
  router share an address, and neither DCMTK's storescp nor Orthanc has one (both bound only the
  time, with their ACSE timeout).

``close_unestablished`` closes an acceptor that has not been established the way pynetdicom's
state machine accepts in its state: ``Association.abort()`` is an A-ABORT request (Evt15), which
fsm.py 3.0.4 does not allow in Sta2 (awaiting the A-ASSOCIATE-RQ): the reactor thread died with
``InvalidEventError: Invalid event 'Evt15' for the current state 'Sta2'``. In Sta2 we shut the
transport down instead: the reactor reads end-of-stream, Evt17, AA-5 (close, back to Sta1).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from ..tls import describe_peer

log = logging.getLogger("cxr_worker.scp")

A_ASSOCIATE_RQ = 0x01
"""PDU type of an A-ASSOCIATE-RQ (PS3.8 9.3.2)."""
PEEK_LIMIT = 65536
"""A pending connection is handed over once this much of its first PDU has arrived (an
A-ASSOCIATE-RQ is a few KiB; a larger first PDU is pynetdicom's to judge)."""
_SLOW_POLL_S = 0.02  # a peer that sends its request slowly: look again after this long


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY, TLS handshakes and pending connections in the
    connection's own thread (see the module docstring).

    Without TCP_NODELAY, Nagle + delayed ACK stall each small C-STORE response ~40-90 ms with DCMTK peers.
    """

    daemon_threads = True  # a pending connection's thread must not hold the interpreter's exit
    request_queue_size = 128  # listen() backlog (socketserver's default: 5): a burst of connects
    # would otherwise overflow it whenever the accept thread waits for the GIL, and each dropped SYN
    # costs its sender a 1 s retransmission
    request_timeout: float = 5.0  # network.association_request_timeout (set by make_server)
    max_pending: int = 64  # network.max_pending_connections (set by make_server)

    def __init__(self, *args, **kwargs) -> None:
        self._pending: OrderedDict[int, socket.socket] = OrderedDict()
        self._evicted: set[int] = set()
        self._pending_lock = threading.Lock()
        self._closing = False
        super().__init__(*args, **kwargs)

    def get_request(self):
        sock, address = self.socket.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_context:
            # No handshake here: this is the accept thread, and a peer that connects and sends
            # nothing would block every other connection. process_request_thread does it.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    @property
    def pending_connections(self) -> int:
        """Connections accepted and not yet handed to pynetdicom (no whole A-ASSOCIATE-RQ yet)."""
        with self._pending_lock:
            return len(self._pending)

    def process_request_thread(self, request, client_address):
        self._admit(request, client_address)
        try:
            ready = self._await_association_request(request, client_address)
        finally:
            with self._pending_lock:
                self._pending.pop(id(request), None)
                evicted = id(request) in self._evicted
                self._evicted.discard(id(request))
        if not ready or evicted or self._closing:
            if evicted:
                log.info("connection from %s:%s closed before its A-ASSOCIATE-RQ: %d connections were "
                         "pending (network.max_pending_connections), it was the oldest",
                         client_address[0], client_address[1], self.max_pending)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting, then close every pending connection (nothing to finish there)."""
        self._closing = True
        super().shutdown()
        with self._pending_lock:
            socks = list(self._pending.values())
        for sock in socks:
            _wake(sock)

    def _admit(self, request, client_address) -> None:
        with self._pending_lock:
            while len(self._pending) >= self.max_pending:
                oldest_id, oldest = self._pending.popitem(last=False)
                self._evicted.add(oldest_id)
                _wake(oldest)
            self._pending[id(request)] = request

    def _await_association_request(self, request, client_address) -> bool:
        """True once the peer's first PDU is here (whole, up to PEEK_LIMIT); False: close it."""
        deadline = time.monotonic() + self.request_timeout
        original_timeout = request.gettimeout()
        peer = f"{client_address[0]}:{client_address[1]}"
        try:
            if isinstance(request, ssl.SSLSocket):
                ready = self._await_tls(request, peer, deadline)
            else:
                ready = self._await_plain(request, peer, deadline)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; so are timeouts and a reset
            if self._closing or id(request) in self._evicted:
                return False
            if isinstance(exc, TimeoutError):
                log.info("connection from %s closed: no A-ASSOCIATE-RQ within %.1f s "
                         "(network.association_request_timeout)", peer, self.request_timeout)
            elif isinstance(request, ssl.SSLSocket):
                log.warning("TLS handshake with %s failed, connection closed: %s", peer, exc)
            else:
                log.debug("connection from %s lost before its A-ASSOCIATE-RQ: %s", peer, exc)
            return False
        if ready:
            request.settimeout(original_timeout)
        return ready

    def _await_plain(self, sock: socket.socket, peer: str, deadline: float) -> bool:
        need = 6  # PDU header: type, reserved, 4-byte length
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            head = sock.recv(need, socket.MSG_PEEK)
            if not head:  # closed by the peer (a port probe, a health check) or by shutdown()
                log.debug("connection from %s closed by the peer before an A-ASSOCIATE-RQ", peer)
                return False
            if head[0] != A_ASSOCIATE_RQ:
                return True  # not a request: pynetdicom answers it as its state machine says (A-ABORT)
            if len(head) >= 6 and need == 6:
                need = min(6 + int.from_bytes(head[2:6], "big"), PEEK_LIMIT)
            if len(head) >= need:
                return True
            time.sleep(min(_SLOW_POLL_S, max(0.0, deadline - time.monotonic())))

    def _await_tls(self, sock: ssl.SSLSocket, peer: str, deadline: float) -> bool:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.do_handshake()
        log.debug("TLS from %s: %s", peer, describe_peer(sock))
        if sock.pending():
            return True
        # The first application data: wait on the raw socket (MSG_PEEK is not possible through TLS).
        raw = socket.socket(fileno=sock.fileno())  # a second object on the same descriptor
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            raw.settimeout(remaining)
            if not raw.recv(1, socket.MSG_PEEK):
                return False
            return True
        finally:
            raw.detach()


def _wake(sock: socket.socket) -> None:
    """Shut a pending connection down from another thread: its waiting recv returns at once."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def close_unestablished(assoc) -> None:
    """Close an acceptor Association that is not established, in a way its state allows.

    Sta2 (transport open, awaiting A-ASSOCIATE-RQ) and Sta1 (the reactor still reading the first
    PDU, its Evt5 queued behind that read): shut the transport down -> Evt17 -> AA-5; an A-ABORT
    request (``abort()``, Evt15) is not a valid event in either (pynetdicom 3.0.4 fsm.py). Any other
    state (Sta3 onwards, where Evt15 is valid): ``abort()``.
    """
    dul = getattr(assoc, "dul", None)
    state = getattr(getattr(dul, "state_machine", None), "current_state", None)
    if state in ("Sta1", "Sta2"):
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if sock is not None:
            _wake(sock)
        # The Association thread waits acse_timeout on to_user_queue for the A-ASSOCIATE primitive;
        # None there is what its timeout returns: it kills itself and closes the socket now.
        # (AA-5 puts nothing on that queue, so this None is never taken for a primitive.)
        dul.to_user_queue.put(None)
        return
    assoc.abort()


def make_server(ae: AE, address: tuple[str, int], evt_handlers: list,
                ssl_context: ssl.SSLContext | None, *, request_timeout: float = 5.0,
                max_pending: int = 64) -> NoDelayServer:
    """A NoDelayServer for ``ae``, bound to ``address``, registered with the AE; the caller serves it."""
    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context,
                            server_class=NoDelayServer)
    server.request_timeout = request_timeout
    server.max_pending = max_pending
    ae._servers.append(server)
    return server
