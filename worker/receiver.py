"""The C-STORE path: make a received instance durable and record it, before Success.

pynetdicom spools each received data set to ``incoming/`` as it arrives (the bytes as sent plus
file meta, never decoded or re-encoded; worker/net/_pynetdicom/spool_file.py). ``Receiver.store``
starts the file's fsync, parses its header meanwhile, hard-links the file into
``spool/<study>/<sop>.dcm`` (atomic, never overwriting), fsyncs the directories that gained a name
beside it (store/spool.fsync_together), commits the instance row, and only then returns: the
listener answers Success. What cannot be made durable raises ``NotDurable`` (0xA700, the sender
retries); a header that cannot be read raises ``Unreadable`` (0xC000). worker/net/status.py maps
both to their statuses.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import StrEnum
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from .errors import NotDurable, Unreadable
from .scoring.eligibility import check, read_header
from .settings import Settings
from .store.db import Database, Instance
from .store.spool import Spool, fsync_later
from .store.studies import record_arrival
from .sr import SOURCE_TAGS, pack_source

log = logging.getLogger("cxr_worker.receiver")

#: Built once, like the study statements (store/studies.py): SQLAlchemy then only binds values.
_NEW_INSTANCE = insert(Instance)


class Received(StrEnum):
    """What ``Receiver.store`` did with an instance (both are answered Success)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same SOP Instance UID is stored already; this copy was dropped


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

    def store(self, tmp: Path, calling_aet: str | None) -> Received:
        """Make ``tmp`` (a spooled data set) durable and record it; raises Unreadable or NotDurable."""
        file_sync = fsync_later(tmp)  # the data's fsync runs while the header is parsed
        try:
            header = read_header(tmp, SOURCE_TAGS)  # and, in the same parse, what its SR will read
        except Exception as exc:  # noqa: BLE001 - unparseable: tell the sender, keep listening
            self._settle(file_sync)
            raise self._quarantine(tmp, f"unreadable DICOM header: {type(exc).__name__}: {exc}") from None
        if not header.study_uid or not header.sop_instance_uid:
            self._settle(file_sync)
            raise self._quarantine(tmp, "missing StudyInstanceUID or SOPInstanceUID")
        sr_attributes = self._sr_attributes(header)  # still inside the fsync's shadow
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
        return self._record(header, final, size, calling_aet, sr_attributes)

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

    def _duplicate(self, header) -> Received:
        self._count("duplicates")
        log.info("duplicate instance %s (study %s) already stored", header.sop_instance_uid, header.study_uid)
        return Received.DUPLICATE

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _quarantine(self, tmp: Path, why: str) -> Unreadable:
        """Move an unreadable file to rejected/ and return the error to raise."""
        self._count("rejected")
        target = self.spool.root / "rejected"
        try:
            target.mkdir(mode=0o700, exist_ok=True)
            tmp.replace(target / f"{int(time.time() * 1000)}-{tmp.name}")
        except OSError:
            tmp.unlink(missing_ok=True)
        log.warning("rejected instance (0xC000): %s", why)
        return Unreadable(why)

    def _record(self, header, final: Path, size: int, calling_aet: str | None,
                sr_attributes: bytes | None = None) -> Received:
        """One transaction: the study's arrival (store/studies.record_arrival) and the instance row.

        SQLAlchemy Core, not the ORM: this is on every C-STORE's critical path (the sender waits
        for our answer), and the ORM's unit of work cost ~1-2 ms more per instance.
        """
        st = self.settings.studies
        checked = check(header, st.allowed_body_parts, st.excluded_view_positions)
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
                self._count("received")
                log.debug("stored %s in study %s", header.sop_instance_uid, header.study_uid)
                return Received.STORED
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
        raise NotDurable(f"could not record instance {header.sop_instance_uid} in the database")


