"""The DICOM listener (SCP): C-ECHO and C-STORE, durable before Success.

pynetdicom spools each received data set to ``incoming/`` as it arrives
(``STORE_RECV_CHUNKED_DATASET``: the bytes as sent plus file meta, never decoded or re-encoded).
The C-STORE handler hands the spooled file to worker/receiver.Receiver, which makes it durable and
records it, and answers 0x0000 only when that returned. Its errors become statuses in
worker/net/status.py (0xA700 when it could not be made durable, so the sender retries; 0xC000
for an unreadable data set).

The spooling is switched on process-wide by worker.net.install(), which the service calls before it
builds the listener; constructing a Listener changes nothing in pynetdicom.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from ..errors import ReceiveError
from ..receiver import Receiver
from ..scoring.eligibility import SCORABLE_SOP_CLASSES
from ..settings import Settings
from ..store.outbox import CommitmentReport, Recorded
from . import status
from ._pynetdicom import spool_file
from .commitment import report_handler
from ._pynetdicom.server import NoDelayServer, close_unestablished, make_server

log = logging.getLogger("cxr_worker.scp")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, still sent by old modalities
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def _handle_echo(event) -> int:
    return status.SUCCESS


def _handle_store(event, receiver: Receiver) -> int:
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        log.error("C-STORE without a spooled data set (STORE_RECV_CHUNKED_DATASET off?)")
        return status.OUT_OF_RESOURCES
    failed = spool_file.failure(path)  # the data set was not spooled: disk below the watermark, or it
    if failed:                         # could not be (disk full, I/O error)
        code, message = failed
        if code == spool_file.REFUSED:
            log.warning("refused instance (0xA700), nothing of it written: %s", message)
        else:
            log.error("cannot spool received instance (%s); answering 0xA700", message)
        receiver.refused(code)
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

    def __init__(self, settings: Settings, receiver: Receiver, ssl_context: ssl.SSLContext | None = None,
                 commitments: Callable[[CommitmentReport], Recorded] | None = None) -> None:
        """``commitments`` records a Storage Commitment report (store/outbox.record_commitment); with
        it the listener accepts the Storage Commitment Push Model context, in the SCU role (the
        report on an association the PACS requests, as Orthanc sends it) or the SCP role."""
        self.settings = settings
        self.ssl_context = ssl_context
        net = settings.network
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
        self.handlers = [(evt.EVT_C_ECHO, _handle_echo), (evt.EVT_C_STORE, _handle_store, [receiver]),
                         (evt.EVT_REJECTED, _handle_rejected)]
        if commitments is not None:
            # The PACS, requesting the association to send its report, proposes the SCP role of the
            # SOP class (SCP/SCU Role Selection); accept it, and the default roles too.
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
            self.handlers.append((evt.EVT_N_EVENT_REPORT, report_handler(commitments)))
        self.ae = ae
        self.server: NoDelayServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        net = self.settings.network
        server = make_server(self.ae, (net.bind_address, net.port), self.handlers, self.ssl_context,
                             request_timeout=net.association_request_timeout,
                             max_pending=net.max_pending_connections)
        self._thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
        self._thread.start()
        self.server = server
        port = server.server_address[1]
        log.info("listening as %s on %s:%s (max %d associations, max PDU %d, %s)", net.ae_title,
                 net.bind_address, port, net.max_associations, net.max_pdu,
                 "DICOM TLS" + (", client certificate required" if self.settings.tls.require_client_certificate
                                else "") if self.ssl_context else "plain TCP, no TLS")
        return port

    def accepting(self) -> bool:
        """Is the listener serving (started, its accept thread alive, not stopping)? For /readyz."""
        return self.server is not None and self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; give established associations up to ``grace`` seconds to finish.

        A connection that has not sent its A-ASSOCIATE-RQ (a port probe, a load balancer's health
        check) is pending in the server, not an association, and ``server.shutdown()`` closes it; an
        association not yet established is closed at once (``close_unestablished``: the way its
        state allows, never an A-ABORT request in Sta2) instead of holding the stop for the ACSE
        timeout with nothing to finish.
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
                    close_unestablished(assoc)
            if not any(assoc.is_established for assoc in open_now):
                break
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_established:
                log.warning("aborting association still open after %.0f s", grace)
                assoc.abort()
            else:  # closed above and ending now (or arrived since): never an A-ABORT request in Sta2
                close_unestablished(assoc)
