"""Storage Commitment Push Model (PS3.4 Annex J) for the SRs the outbox delivered.

As the SCU of Storage Commitment the worker asks a destination, with an N-ACTION (action type 1,
a Transaction UID and the Referenced SOP Sequence of the SRs), to take responsibility for them; the
destination answers later with an N-EVENT-REPORT (event type 1: all committed; 2: failures exist,
Failed SOP Sequence with a Failure Reason per instance). A PACS may send that report on the same
association or, as Orthanc does, on a new association to the AE it knows as the requester: our
listener (worker/net/listener.py) accepts the Storage Commitment Push Model context in either role
and hands each report, as a plain ``store.outbox.CommitmentReport``, to the outbox bookkeeping.

``request_commitment`` sends the N-ACTION over the outbox's kept association for that destination
(``AssociationPool``: one association carries the C-STOREs and the request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from ..store.outbox import CommitmentReport, Recorded
from . import status
from ._pynetdicom.reactor import reactor_parked
from .associations import AssociationPool, OneShot, Peer, association_lost

log = logging.getLogger("cxr_worker.commitment")

#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION action type: Request Storage Commitment.
REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT event types: all committed, failures exist.
ALL_COMMITTED, FAILURES_EXIST = 1, 2
#: N-EVENT-REPORT-RSP: No Such Event Type.
NO_SUCH_EVENT_TYPE = 0x0113

CONTEXT = (str(StorageCommitmentPushModel), (ExplicitVRLittleEndian, ImplicitVRLittleEndian))


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def sop_class_of(path: Path) -> str | None:
    """The SOP Class UID of a stored file (its file meta; the SRs the worker writes always have it)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        value = str(meta.get("MediaStorageSOPClassUID") or "")
        if value:
            return value
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
    except Exception:  # noqa: BLE001 - the file is gone or unreadable: the caller says so
        return None


def request_commitment(peer: Peer, transaction_uid: str, references: Sequence[tuple[str, str]],
                       pool: AssociationPool | None = None) -> str | None:
    """N-ACTION Request Storage Commitment of ``references`` ((SOP class, SOP instance) pairs).

    None when the peer answered Success (its report comes later), else why not: the caller tries
    again later. Never raises for a peer problem.
    """
    action = Dataset()
    action.TransactionUID = transaction_uid
    action.ReferencedSOPSequence = [_reference(c, i) for c, i in references]
    link = pool if pool is not None else OneShot()
    try:
        assoc, _reused, reason = link.checkout(peer, [CONTEXT])
        if assoc is None:
            return str(reason)
        ok = False
        try:
            if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
                return f"{peer.called_aet}@{peer.host}:{peer.port} does not accept Storage Commitment Push Model"
            with reactor_parked(assoc):
                try:
                    rsp, _reply = assoc.send_n_action(action, REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                                      PUSH_MODEL_INSTANCE)
                except Exception as exc:  # noqa: BLE001 - a peer problem, reported
                    return f"cannot send the storage commitment request: {exc}"
            code = rsp.get("Status") if rsp is not None else None
            if code is None:
                return "no N-ACTION response (timeout or association aborted)"
            if int(code) != status.SUCCESS:
                comment = str(rsp.get("ErrorComment", "") or "")
                return f"storage commitment request refused with status 0x{int(code):04X}" + \
                    (f" ({comment})" if comment else "")
            ok = True
            return None
        finally:
            link.checkin(assoc, keep=ok and not association_lost(assoc))
    finally:
        if pool is None:
            link.close()


def parse_report(event_type: int, info: Dataset | None) -> CommitmentReport | str:
    """The report in an N-EVENT-REPORT's Event Information, or why it is not one."""
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        return f"event type {event_type} is not a storage commitment result"
    if info is None or not info.get("TransactionUID"):
        return "no Transaction UID in the event information"
    committed = tuple(str(item.get("ReferencedSOPInstanceUID", "")) for item in info.get("ReferencedSOPSequence", [])
                      if item.get("ReferencedSOPInstanceUID"))
    failed: dict[str, int | None] = {}
    for item in info.get("FailedSOPSequence", []):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            reason = item.get("FailureReason")
            failed[str(uid)] = int(reason) if reason is not None else None
    return CommitmentReport(str(info.TransactionUID), committed, failed)


def report_handler(record: Callable[[CommitmentReport], Recorded]) -> Callable:
    """The EVT_N_EVENT_REPORT handler for the listener: parse, ``record``, answer.

    A report of an unknown or superseded transaction is answered Success and ignored (the PACS did
    its part; there is nothing of ours waiting on it); one that cannot be recorded now (database
    error) is answered with a failure so that the PACS may send it again, and the request times
    out and is repeated otherwise.
    """

    def handle(event) -> tuple[int, Dataset | None]:
        request = event.request
        sender = (event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor).ae_title
        if request.AffectedSOPClassUID != StorageCommitmentPushModel:
            return status.PROCESSING_FAILURE, None
        try:
            info = event.event_information
        except Exception as exc:  # noqa: BLE001 - an undecodable data set
            log.warning("storage commitment report from %s: cannot read it: %s", sender, exc)
            return status.PROCESSING_FAILURE, None
        report = parse_report(int(request.EventTypeID or 0), info)
        if isinstance(report, str):
            log.warning("N-EVENT-REPORT from %s ignored: %s", sender, report)
            return (NO_SUCH_EVENT_TYPE if "event type" in report else status.PROCESSING_FAILURE), None
        try:
            recorded = record(report)
        except Exception:  # noqa: BLE001 - never let a handler error take the listener down
            log.exception("cannot record the storage commitment report of transaction %s", report.transaction_uid)
            return status.PROCESSING_FAILURE, None
        if not recorded.known:
            log.info("storage commitment report for unknown or superseded transaction %s from %s ignored",
                     report.transaction_uid, sender)
        else:
            log.info("storage commitment transaction %s from %s: %d committed, %d failed%s",
                     report.transaction_uid, sender, recorded.committed, recorded.resend,
                     " (sent again)" if recorded.resend else "")
        return status.SUCCESS, None  # no Event Reply for this SOP class

    return handle


def report_handlers(record: Callable[[CommitmentReport], Recorded]) -> tuple:
    """Handlers for the associations the outbox requests (AssociationPool(handlers=...)): a PACS
    that sends its report on the association that carried the request is answered there."""
    return ((evt.EVT_N_EVENT_REPORT, report_handler(record)),)
