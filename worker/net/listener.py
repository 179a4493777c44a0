"""The DICOM listener (SCP): C-ECHO and C-STORE, durable before Success.

pynetdicom spools each received data set to ``incoming/`` as it arrives
(``STORE_RECV_CHUNKED_DATASET``: the bytes as sent plus file meta, never decoded or re-encoded).
The C-STORE handler hands the spooled file to worker/receiver.Receiver, which makes it durable and
records it, and answers 0x0000 only when that returned. Its errors become statuses in
worker/net/status.py (0xA700 when it could not be made durable, so the sender retries; 0xC000
for an unreadable data set).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from ..errors import ReceiveError
from ..receiver import Receiver
from ..scoring.eligibility import SCORABLE_SOP_CLASSES
from ..settings import Settings
from . import status
from ._pynetdicom import recv as fastrecv
from ._pynetdicom import spool_file as incoming
from .tls import describe_peer

log = logging.getLogger("cxr_worker.scp")

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE Lossless
]

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


def _handle_echo(event) -> int:
    return status.SUCCESS


def _handle_store(event, receiver: Receiver) -> int:
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        log.error("C-STORE without a spooled data set (STORE_RECV_CHUNKED_DATASET off?)")
        return status.OUT_OF_RESOURCES
    failed = incoming.failure(path)  # the data set could not even be spooled (disk full, I/O error)
    if failed:
        log.error("cannot spool received instance (%s); answering 0xA700", failed)
        return status.OUT_OF_RESOURCES
    try:
        receiver.store(path, event.assoc.requestor.ae_title)
    except ReceiveError as exc:  # logged by the receiver with its reason
        return status.store_status(exc)
    except Exception:  # noqa: BLE001 - never let a handler error take anything down
        log.exception("cannot persist received instance; answering 0xA700")
        return status.OUT_OF_RESOURCES
    return status.SUCCESS


def _handle_rejected(event) -> None:
    rq, rj = event.assoc.requestor, getattr(event.assoc.acceptor, "primitive", None)
    called = getattr(rq.primitive, "called_ae_title", None)
    log.warning("association from %s:%s rejected (%s): calling AE %r, called AE %r", rq.address, rq.port,
                getattr(rj, "reason_str", "?"), rq.ae_title, called)


class Listener:
    """The AE and its server thread; stop() stops accepting, lets running associations finish."""

    def __init__(self, settings: Settings, receiver: Receiver, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        net = settings.network
        _config.STORE_RECV_CHUNKED_DATASET = True
        # spool into incoming/ (same filesystem as the spool); a failed write: 0xA700, not an A-ABORT
        incoming.install(settings.storage.writeback_bytes, receiver.spool.incoming)
        fastrecv.install()  # whole PDUs per read instead of 4 KiB pieces
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=net.ae_title)
        ae.maximum_associations = net.max_associations
        ae.maximum_pdu_size = net.max_pdu
        ae.require_called_aet = net.require_called_aet
        ae.require_calling_aet = list(net.allowed_calling_aets)
        ae.acse_timeout = net.acse_timeout
        ae.dimse_timeout = net.dimse_timeout
        ae.network_timeout = net.network_timeout
        ae.add_supported_context(Verification)
        for sop_class in SCORABLE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.ae = ae
        self.handlers = [(evt.EVT_C_ECHO, _handle_echo), (evt.EVT_C_STORE, _handle_store, [receiver]),
                         (evt.EVT_REJECTED, _handle_rejected)]
        self.server: NoDelayServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        net = self.settings.network
        server = self.ae.make_server((net.bind_address, net.port), evt_handlers=self.handlers,
                                     ssl_context=self.ssl_context, server_class=NoDelayServer)
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
        self._thread.start()
        self.server = server
        port = server.server_address[1]
        log.info("listening as %s on %s:%s (max %d associations, max PDU %d, %s)", net.ae_title,
                 net.bind_address, port, net.max_associations, net.max_pdu,
                 "DICOM TLS" + (", client certificate required" if self.settings.tls.require_client_certificate
                                else "") if self.ssl_context else "plain TCP, no TLS")
        return port

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; give established associations up to ``grace`` seconds to finish.

        A connection that has not been established (no A-ASSOCIATE-RQ yet: a port probe, a load
        balancer's health check) is aborted at once: otherwise it would hold the stop for the
        ACSE timeout with nothing to finish.
        """
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()  # stop accepting, close the listening socket
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            open_now = list(server.active_associations)
            for assoc in open_now:
                if not assoc.is_established:
                    assoc.abort()
            if not any(assoc.is_established for assoc in open_now):
                break
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting association still open after %.0f s", grace)
            assoc.abort()
