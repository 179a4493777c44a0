"""The DICOM listener: C-ECHO and C-STORE, durable before Success.

pynetdicom spools each received data set to ``incoming/`` as it arrives
(``STORE_RECV_CHUNKED_DATASET``: the bytes as sent plus file meta, never decoded or re-encoded).
The C-STORE handler starts the file's fsync, parses its header meanwhile, hard-links the file into
``spool/<study>/<sop>.dcm`` (atomic, never overwriting), fsyncs the directories that gained a name
beside it (spool.fsync_together), commits the instance row, and only then answers 0x0000.
Anything that cannot be made durable is answered 0xA700 (out of resources) so the sender retries.
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
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from . import db as dbm
from . import fastrecv, incoming
from .db import Database, Instance, Study
from .eligibility import SCORABLE_SOP_CLASSES, check, read_header
from .settings import Settings
from .spool import Spool, fsync_later
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

#: The C-STORE path's statements, built once: SQLAlchemy then only binds values (building a statement
#: per call with its values cost ~0.6 ms of Python per instance, more than SQLite's commit).
_STUDY_ROW = select(Study.id, Study.status).where(Study.study_uid == bindparam("uid")).with_for_update()
_NEW_STUDY = insert(Study)
_TOUCH_STUDY = (update(Study).where(Study.id == bindparam("sid"))
                .values(n_instances=Study.n_instances + 1, last_received=bindparam("now"), updated=bindparam("now"),
                        status=bindparam("new_status")))
_NEW_INSTANCE = insert(Instance)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


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


class Receiver:
    """Makes received instances durable and records them (called on the network threads)."""

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.received = 0
        self.duplicates = 0
        self.rejected = 0
        self._lock = threading.Lock()

    def store(self, tmp: Path, calling_aet: str | None) -> int:
        file_sync = fsync_later(tmp)  # the data's fsync runs while the header is parsed
        try:
            header = read_header(tmp)
        except Exception as exc:  # noqa: BLE001 - unparseable: tell the sender, keep listening
            self._settle(file_sync)
            self._quarantine(tmp, f"unreadable DICOM header: {type(exc).__name__}: {exc}")
            return STATUS_CANNOT_UNDERSTAND
        if not header.study_uid or not header.sop_instance_uid:
            self._settle(file_sync)
            self._quarantine(tmp, "missing StudyInstanceUID or SOPInstanceUID")
            return STATUS_CANNOT_UNDERSTAND
        final = self.spool.instance_path(header.study_uid, header.sop_instance_uid)
        size = tmp.stat().st_size
        # No "already stored?" query first: the spool name is the instance's, so a duplicate
        # finds its file taken (adopt -> False) or its row taken (IntegrityError in _record).
        if not self.spool.adopt(tmp, final, file_sync):
            self._settle(file_sync)
            if self._recorded_path(header.sop_instance_uid) is not None:
                tmp.unlink(missing_ok=True)
                return self._duplicate(header)
            # A file without a row: a crash between rename and commit; Success was never sent, so
            # this is the sender's retry. Its bytes replace the unrecorded file.
            log.info("replacing unrecorded spool file for %s", header.sop_instance_uid)
            self.spool.replace(tmp, final)
        return self._record(header, final, size, calling_aet)

    @staticmethod
    def _settle(file_sync) -> None:
        """Wait for a started fsync whose file is not kept after all (its error no longer matters)."""
        try:
            file_sync.result()
        except OSError:
            pass

    def _recorded_path(self, sop_uid: str) -> str | None:
        """The spool path recorded for this SOP Instance UID, or None when it is not stored yet."""
        with self.db.engine.connect() as conn:
            return conn.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))

    def _duplicate(self, header) -> int:
        self._count("duplicates")
        log.info("duplicate instance %s (study %s) already stored", header.sop_instance_uid, header.study_uid)
        return STATUS_SUCCESS

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _quarantine(self, tmp: Path, why: str) -> None:
        self._count("rejected")
        target = self.spool.root / "rejected"
        try:
            target.mkdir(mode=0o700, exist_ok=True)
            tmp.replace(target / f"{int(time.time() * 1000)}-{tmp.name}")
        except OSError:
            tmp.unlink(missing_ok=True)
        log.warning("rejected instance (0xC000): %s", why)

    def _record(self, header, final: Path, size: int, calling_aet: str | None) -> int:
        """One transaction: the study row (created or touched) and the instance row.

        SQLAlchemy Core, not the ORM: this is on every C-STORE's critical path (the sender waits
        for our answer), and the ORM's unit of work cost ~1-2 ms more per instance.
        """
        st = self.settings.studies
        eligible, reason, detail = check(header, st.allowed_body_parts, st.excluded_view_positions)
        for attempt in range(5):
            now = time.time()
            try:
                with self.db.engine.begin() as conn:
                    study = conn.execute(_STUDY_ROW, {"uid": header.study_uid}).first()
                    if study is None:
                        conn.execute(_NEW_STUDY, dict(
                            study_uid=header.study_uid, accession=header.accession, status=dbm.STUDY_RECEIVING,
                            n_instances=1, first_received=now, last_received=now, updated=now, attempts=0,
                            revision=0, scored_instances=0))
                    else:
                        status = study.status
                        if status in (dbm.STUDY_DONE, dbm.STUDY_NO_ELIGIBLE, dbm.STUDY_FAILED):
                            if st.rescore_late_arrivals:
                                status = dbm.STUDY_RECEIVING
                                log.info("study %s: new instance after scoring; re-opened for a new SR revision",
                                         header.study_uid)
                            else:
                                eligible, reason = False, "late_arrival"
                                detail = "arrived after the study was scored (studies.rescore_late_arrivals=false)"
                        elif status == dbm.STUDY_READY:
                            status = dbm.STUDY_RECEIVING  # restart the quiet period
                        conn.execute(_TOUCH_STUDY, {"sid": study.id, "now": now, "new_status": status})
                    conn.execute(_NEW_INSTANCE, dict(
                        sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
                        series_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
                        transfer_syntax=header.transfer_syntax, modality=header.modality, body_part=header.body_part,
                        view_position=header.view_position, path=str(final), size=size, calling_aet=calling_aet,
                        received=now, eligible=eligible, reason=reason, detail=detail, probability=None, frame=None))
                self._count("received")
                log.debug("stored %s in study %s", header.sop_instance_uid, header.study_uid)
                return STATUS_SUCCESS
            except IntegrityError:
                recorded = self._recorded_path(header.sop_instance_uid)
                if recorded is not None:  # stored before, or a concurrent copy won
                    if Path(recorded) != final:  # the same UID sent under another study: drop its extra link
                        final.unlink(missing_ok=True)
                    return self._duplicate(header)
                time.sleep(0.05 * (attempt + 1))       # concurrent first instance of the same study
            except OperationalError as exc:
                log.warning("database busy/unavailable storing %s: %s", header.sop_instance_uid, exc)
                time.sleep(0.2 * (attempt + 1))
        log.error("could not record instance %s; answering 0xA700", header.sop_instance_uid)
        return STATUS_OUT_OF_RESOURCES


def _handle_echo(event) -> int:
    return STATUS_SUCCESS


def _handle_store(event, receiver: Receiver) -> int:
    try:
        path = Path(event.dataset_path)
    except AttributeError:
        log.error("C-STORE without a spooled data set (STORE_RECV_CHUNKED_DATASET off?)")
        return STATUS_OUT_OF_RESOURCES
    failed = incoming.failure(path)  # the data set could not even be spooled (disk full, I/O error)
    if failed:
        log.error("cannot spool received instance (%s); answering 0xA700", failed)
        return STATUS_OUT_OF_RESOURCES
    try:
        return receiver.store(path, event.assoc.requestor.ae_title)
    except Exception:  # noqa: BLE001 - never let a handler error take anything down
        log.exception("cannot persist received instance; answering 0xA700")
        return STATUS_OUT_OF_RESOURCES


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
