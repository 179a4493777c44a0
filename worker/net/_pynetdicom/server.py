"""The listener's association server: pynetdicom's threaded server, TCP_NODELAY, TLS off the accept thread.

pynetdicom 3.0.4: ``AssociationServer.get_request`` accepts and, with an SSL context, wraps the socket
with the handshake done at once, on the accept thread; ``NoDelayServer`` replaces it (so it relies on
that method doing nothing else) and does the handshake in the association's own thread.
``AE.start_server(block=False)`` hard-codes its server class, so ``make_server`` builds ours with
``AE.make_server`` and registers it in ``ae._servers`` as ``start_server`` does: the server's
``shutdown()`` removes itself from that list, and ``AE.shutdown()`` stops what it lists.
"""

from __future__ import annotations

import logging
import socket
import ssl

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from ..tls import describe_peer

log = logging.getLogger("cxr_worker.scp")


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on accepted sockets.

    Without it, Nagle + delayed ACK stall each small C-STORE response ~40-90 ms with DCMTK peers.
    """

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

    def process_request_thread(self, request, client_address):
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.acse_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; timeouts too
                log.warning("TLS handshake with %s:%s failed, connection closed: %s",
                            client_address[0], client_address[1], exc)
                self.shutdown_request(request)
                return
            log.debug("TLS from %s:%s: %s", client_address[0], client_address[1], describe_peer(request))
        super().process_request_thread(request, client_address)


def make_server(ae: AE, address: tuple[str, int], evt_handlers: list,
                ssl_context: ssl.SSLContext | None) -> NoDelayServer:
    """A NoDelayServer for ``ae``, bound to ``address``, registered with the AE; the caller serves it."""
    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context,
                            server_class=NoDelayServer)
    ae._servers.append(server)
    return server
