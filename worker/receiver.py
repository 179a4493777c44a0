"""The C-STORE path: make a received instance durable and record it, before Success.

pynetdicom spools each received data set to ``incoming/`` as it arrives (the bytes as sent plus
file meta, never decoded or re-encoded; worker/net/_pynetdicom/spool_file.py). ``Receiver.store``
starts the file's fsync, parses its header meanwhile, hard-links the file into
``spool/<study>/<sop>.dcm`` (atomic, never overwriting), fsyncs the directories that gained a name
beside it (store/spool.fsync_together), commits the instance row, and only then returns: the
listener answers Success. What cannot be made durable raises ``NotDurable`` (0xA700, the sender
retries); a data set that is cut short or malformed anywhere (scoring/eligibility.check_encoding, one
walk over the element headers, also in the fsync's shadow), whose header cannot be read, or whose
identifying UIDs are not valid UIDs raises ``Unreadable`` (0xC000), its file in ``rejected/``.
worker/net/status.py maps both to their statuses.

The same SOP Instance UID received again (docs/worker.md, "One study, one result, one SR"):
the same data set bytes: a duplicate, dropped; different bytes while the stored copy is unusable
(not eligible for a reason found decoding its pixels): the new copy replaces it (the spool file
atomically, the row rewritten, the study re-evaluated as by an arrival); different bytes otherwise:
the first copy is kept, a WARNING logged, Success answered. Whichever of two copies arriving at the
same moment commits its row first is the one whose file is in the spool: a copy that finds the file
taken and no row places its file only inside the transaction that inserts the row.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from enum import StrEnum
from pathlib import Path

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from trainer.model_info import read_model_info

from .errors import DiskFull, NotDurable, ReceiveError, Unreadable
from .metrics import Metrics, Outcome
from .scoring.intended_use import IntendedUse, site_values
from .scoring.eligibility import HEADER_REASONS, BrokenEncoding, check, check_encoding, invalid_uid, read_header
from .settings import Settings
from .store.db import Database, Instance
from .store.spool import Spool, fsync_later
from .store.studies import LATE_ARRIVAL, record_arrival
from .sr import SOURCE_TAGS, pack_source

log = logging.getLogger("cxr_worker.receiver")

#: Built once, like the study statements (store/studies.py): SQLAlchemy then only binds values.
_NEW_INSTANCE = insert(Instance)
#: A stored instance as a resend compares with it.
_STORED = select(Instance.id, Instance.path, Instance.study_uid, Instance.eligible, Instance.reason,
                 Instance.size).where(Instance.sop_instance_uid == bindparam("sop"))
#: Not-eligible reasons that do not make a stored copy unusable: the header said so (a resend with other
#: bytes is the same kind of image), or the study had been scored (studies.rescore_late_arrivals=false).
_KEPT_REASONS = frozenset((*HEADER_REASONS, LATE_ARRIVAL[0]))


class Received(StrEnum):
    """What ``Receiver.store`` did with an instance (both are answered Success)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same SOP Instance UID is stored already; this copy was dropped
    REPLACED = "replaced"    # it replaced a stored copy that could not be used (its pixels did not decode)


class Receiver:
    """Makes received instances durable and records them (called on the network threads)."""

    def __init__(self, settings: Settings, db: Database, spool: Spool, metrics: Metrics | None = None) -> None:
        self.settings = settings
        # the header checks: the site's [intended_use] over the checkpoint's (its header only, no torch)
        self.intended_use = IntendedUse.resolve(site_values(settings.intended_use),
                                                read_model_info(settings.model.path).intended_use)
        self.db = db
        self.spool = spool
        self.metrics = metrics if metrics is not None else Metrics()
        self.received = 0
        self.duplicates = 0
        self.rejected = 0
        self.replaced = 0
        self._lock = threading.Lock()

    def store(self, tmp: Path, calling_aet: str | None) -> Received:
        """Make ``tmp`` (a spooled data set) durable and record it; raises Unreadable or NotDurable
        (DiskFull first of all, before anything is kept, while the disk is below storage.min_free_bytes).
        Every outcome is counted in ``cxr_worker_instances_received_total``."""
        try:
            received = self._store(tmp, calling_aet)
        except ReceiveError as exc:
            self.metrics.received(Outcome.REJECTED if isinstance(exc, Unreadable) else Outcome.REFUSED, exc.reason)
            raise
        except BaseException as exc:  # the listener answers 0xA700 for these too (a spool OSError, a bug)
            self.metrics.received(Outcome.REFUSED, "spool" if isinstance(exc, OSError) else "error")
            raise
        self.metrics.received(Outcome(received.value))
        return received

    def refused(self, reason: str) -> None:
        """Count an instance the listener answered 0xA700 without calling ``store`` (spooling failed)."""
        self.metrics.received(Outcome.REFUSED, reason)

    def _store(self, tmp: Path, calling_aet: str | None) -> Received:
        if (why := self.spool.watermark.refusal()) is not None:
            # Below the watermark: nothing is kept. A data set that began below it was never written
            # (net/_pynetdicom/spool_file asks the watermark first); one during which free space fell
            # below it is removed here before the answer (no fsync was started): nothing partial remains.
            tmp.unlink(missing_ok=True)
            log.warning("refused instance (0xA700) on the data directory's filesystem: %s", why)
            raise DiskFull(why)
        file_sync = fsync_later(tmp)  # the data's fsync runs while the encoding is checked and parsed
        try:
            encoding = check_encoding(tmp)          # every element whole, sequences closed (no values read)
            header = read_header(tmp, SOURCE_TAGS)  # and, in one parse, what its SR will read
        except BrokenEncoding as exc:
            self._settle(file_sync)
            raise self._quarantine(tmp, f"incomplete or malformed data set: {exc}", "malformed") from None
        except Exception as exc:  # noqa: BLE001 - unparseable: tell the sender, keep listening
            self._settle(file_sync)
            raise self._quarantine(tmp, f"unreadable DICOM header: {type(exc).__name__}: {exc}",
                                   "unreadable_header") from None
        if not header.study_uid or not header.sop_instance_uid:
            self._settle(file_sync)
            raise self._quarantine(tmp, "missing StudyInstanceUID or SOPInstanceUID", "missing_uid")
        if (bad := invalid_uid(header)) is not None:
            self._settle(file_sync)
            raise self._quarantine(tmp, bad, "invalid_uid")
        sr_attributes = self._sr_attributes(header)  # still inside the fsync's shadow
        final = self.spool.instance_path(header.study_uid, header.sop_instance_uid)
        size = tmp.stat().st_size
        # No "already stored?" query first: the spool name is the instance's, so a duplicate
        # finds its file taken (adopt -> False) or its row taken (IntegrityError in _record).
        if self.spool.adopt(tmp, final, file_sync):
            return self._record(header, final, size, calling_aet, sr_attributes)
        self._settle(file_sync)
        stored = self._stored(header.sop_instance_uid)
        if stored is None:
            # A file without a row: a crash between link and commit (Success was never sent, this is the
            # sender's retry), or a copy of the same instance still being recorded by another
            # association. Whichever commits its row first owns the file: this copy's bytes replace the
            # file only inside the transaction that inserts its row (_record's ``place``).
            return self._record(header, final, size, calling_aet, sr_attributes, place=tmp)
        return self._resent(tmp, header, encoding.dataset_offset, final, size, stored, calling_aet, sr_attributes)

    def _stored(self, sop_uid: str):
        """The stored row of this SOP Instance UID (id, path, study_uid, eligible, reason, size), or None."""
        with self.db.engine.connect() as conn:
            return conn.execute(_STORED, {"sop": sop_uid}).first()

    @staticmethod
    def _unusable(stored) -> bool:
        """The stored copy cannot be scored for a reason found in its pixels (a resend may mend it)."""
        return not stored.eligible and stored.reason is not None and stored.reason not in _KEPT_REASONS

    def _resent(self, tmp: Path, header, offset: int, final: Path, size: int, stored, calling_aet, sr_attributes):
        """The same SOP Instance UID again: a duplicate, or the replacement of an unusable copy."""
        if Path(stored.path) != final:  # the same UID under another study: the first one stands
            tmp.unlink(missing_ok=True)
            log.warning("instance %s received again under another study (%s, stored under %s); the first is "
                        "kept", header.sop_instance_uid, header.study_uid, stored.study_uid)
            return self._duplicate(header, logged=True)
        # (the size check: a replacement whose fsync failed after its rename left the new bytes under
        # the old row, answered 0xA700; its retry finds them equal and must still rewrite the row)
        if same_data_set(tmp, offset, final) and (final.stat().st_size == stored.size or not self._unusable(stored)):
            tmp.unlink(missing_ok=True)
            return self._duplicate(header)
        if not self._unusable(stored):
            tmp.unlink(missing_ok=True)
            log.warning("instance %s (study %s) received again with different content; the stored copy is "
                        "kept (answered Success)", header.sop_instance_uid, header.study_uid)
            return self._duplicate(header, logged=True)
        return self._replace(tmp, header, final, size, stored, calling_aet, sr_attributes)

    def _replace(self, tmp: Path, header, final: Path, size: int, stored, calling_aet, sr_attributes) -> Received:
        """One transaction: the row rewritten for the new file, the file put in place, the study
        re-evaluated (store/studies.record_arrival with ``replacing``)."""
        st = self.settings.studies
        eligible, reason, detail = check(header, self.intended_use)
        now = time.time()
        try:
            with self.db.write() as conn:
                current = conn.execute(_STORED.with_for_update(), {"sop": header.sop_instance_uid}).first()
                if current is None or current.path != stored.path or not self._unusable(current):
                    # a concurrent copy replaced it first: this one is a duplicate of that
                    tmp.unlink(missing_ok=True)
                    return self._duplicate(header)
                late = record_arrival(conn, header.study_uid, header.accession, now, st.rescore_late_arrivals,
                                      replacing=True)
                if late is not None:
                    eligible, (reason, detail) = False, late
                conn.execute(update(Instance).where(Instance.id == current.id).values(
                    series_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
                    transfer_syntax=header.transfer_syntax, modality=header.modality, body_part=header.body_part,
                    view_position=header.view_position, size=size, calling_aet=calling_aet, received=now,
                    eligible=eligible, reason=reason, detail=detail, probability=None, frame=None,
                    sr_attributes=sr_attributes))
                self.spool.replace(tmp, final)  # before the commit: the row never describes the old file
        except OperationalError as exc:
            log.warning("database busy/unavailable replacing %s: %s", header.sop_instance_uid, exc)
            raise NotDurable(f"could not record instance {header.sop_instance_uid} in the database",
                             "database") from None
        except OSError as exc:
            raise NotDurable(f"could not replace the spool file of {header.sop_instance_uid}: {exc}", "spool") from None
        self._count("replaced")
        log.info("instance %s (study %s) replaced its stored copy, which could not be used (%s); the study "
                 "is evaluated again", header.sop_instance_uid, header.study_uid, stored.reason)
        return Received.REPLACED

    @staticmethod
    def _sr_attributes(header) -> bytes | None:
        """What the SR will read from this image (worker.sr.pack_source), or None: the SR reads the file."""
        try:
            return pack_source(header.dataset)
        except Exception:  # noqa: BLE001 - never refuse an image over its SR's shortcut
            log.warning("SR attributes of %s not kept; its SR will read the file", header.sop_instance_uid,
                        exc_info=True)
            return None

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

    def _duplicate(self, header, logged: bool = False) -> Received:
        self._count("duplicates")
        if not logged:
            log.info("duplicate instance %s (study %s) already stored", header.sop_instance_uid, header.study_uid)
        return Received.DUPLICATE

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _quarantine(self, tmp: Path, why: str, reason: str) -> Unreadable:
        """Move an unreadable file to rejected/ and return the error to raise."""
        self._count("rejected")
        target = self.spool.root / "rejected"
        try:
            target.mkdir(mode=0o700, exist_ok=True)
            tmp.replace(target / f"{int(time.time() * 1000)}-{tmp.name}")
        except OSError:
            tmp.unlink(missing_ok=True)
        log.warning("rejected instance (0xC000): %s", why)
        return Unreadable(why, reason)

    def _record(self, header, final: Path, size: int, calling_aet: str | None,
                sr_attributes: bytes | None = None, place: Path | None = None) -> Received:
        """One transaction: the study's arrival (store/studies.record_arrival) and the instance row.

        ``place``: this copy's file, put at ``final`` (replacing the file found there without a row)
        after the row is inserted and before the commit; a copy whose row loses is dropped unplaced.

        SQLAlchemy Core, not the ORM: this is on every C-STORE's critical path (the sender waits
        for our answer), and the ORM's unit of work cost ~1-2 ms more per instance.
        """
        st = self.settings.studies
        checked = check(header, self.intended_use)
        for attempt in range(5):
            now = time.time()
            eligible, reason, detail = checked
            try:
                with self.db.write() as conn:
                    late = record_arrival(conn, header.study_uid, header.accession, now, st.rescore_late_arrivals)
                    if late is not None:
                        eligible, (reason, detail) = False, late
                    conn.execute(_NEW_INSTANCE, dict(
                        sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
                        series_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
                        transfer_syntax=header.transfer_syntax, modality=header.modality, body_part=header.body_part,
                        view_position=header.view_position, path=str(final), size=size, calling_aet=calling_aet,
                        received=now, eligible=eligible, reason=reason, detail=detail, probability=None, frame=None,
                        sr_attributes=sr_attributes))
                    if place is not None and place.exists():  # (a retried attempt placed it already)
                        self.spool.replace(place, final)
                self._count("received")
                log.debug("stored %s in study %s", header.sop_instance_uid, header.study_uid)
                return Received.STORED
            except IntegrityError:
                recorded = self._recorded_path(header.sop_instance_uid)
                if recorded is not None:  # stored before, or a concurrent copy won
                    if place is not None:  # the file at final is the winner's: leave it
                        place.unlink(missing_ok=True)
                    elif Path(recorded) != final:  # the same UID sent under another study: drop its extra link
                        final.unlink(missing_ok=True)
                    return self._duplicate(header)
                time.sleep(0.05 * (attempt + 1))       # concurrent first instance of the same study
            except OperationalError as exc:
                log.warning("database busy/unavailable storing %s: %s", header.sop_instance_uid, exc)
                time.sleep(0.2 * (attempt + 1))
        log.error("could not record instance %s; answering 0xA700", header.sop_instance_uid)
        raise NotDurable(f"could not record instance {header.sop_instance_uid} in the database", "database")


def same_data_set(received: Path, offset: int, stored: Path, chunk: int = 1 << 20) -> bool:
    """Do the two files hold the same data set bytes? (The file meta is the receiver's own and may
    differ.) Sizes first, then the bytes compared chunk by chunk, stopping at the first difference:
    only a resend pays this, never a first receipt."""
    try:
        theirs = check_encoding(stored).dataset_offset
    except (OSError, BrokenEncoding):
        return False
    if os.path.getsize(received) - offset != os.path.getsize(stored) - theirs:
        return False
    with open(received, "rb") as a, open(stored, "rb") as b:
        a.seek(offset)
        b.seek(theirs)
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if x != y:
                return False
            if not x:
                return True
