"""Outbox rows: one DICOM file (an SR, or a heatmap object it references) for one destination, and the
only code that changes their state.

An SR's heatmap objects (``kind`` set, ``evidence_for`` = the SR's SOP Instance UID) are enqueued with
it and go first: an SR row is not due while one of its objects for the same destination is pending or
sending, so a viewer never gets an SR whose evidence is missing; each object has its own retries,
leases and storage commitment, exactly as an SR.

    (none)  --enqueue--> pending               one row per destination of a committed SR
    pending --claim_due--> sending --mark_sent / settle(accepted)--> sent
    sending --settle(retry_at)--> pending      a failed try; worker/outbox_loop.py computes the backoff
    sending --reclaim--> pending               the claimer's lease expired or its process is gone

Storage commitment (rows of a destination with ``storage_commitment = true``, ``commitment`` set):

    sent --claim_commitments--> committing     the request is due (next_attempt); the N-ACTION goes out
                                               with the row's commitment_uid recorded first
    committing --not_requested--> sent         the N-ACTION failed (peer down, refused): again after backoff
    committing --record_commitment--> committed  the N-EVENT-REPORT lists the SR as committed
    committing --record_commitment--> pending    ... lists it as failed: it is sent again, then requested again
    committing --expire_commitments--> sent    no report within commitment_timeout (or the requester died):
                                               requested again (a new Transaction UID) after backoff

A claimed row is changed only while its claimer (``owner``) still holds the lease; a commitment
report is recorded by whichever worker's listener receives it, matched by its Transaction UID
alone (a report for an unknown or superseded transaction changes nothing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sqlalchemy import Connection, and_, bindparam, exists, insert, select, update

from .db import Database, OutboxItem, OutboxState, clip, owner_is_dead_here

BATCH = 32

# The per-SR statements, built once: a Core statement built per call cost ~0.25 ms of CPU more
# (construction and cache key) than executing a prebuilt one.
_T = OutboxItem.__table__
_NEW = insert(_T)
_E = _T.alias("evidence")
#: an object of this row's SR not yet delivered to this row's destination (the SR waits for it)
_WAITING_EVIDENCE = exists().where(and_(_E.c.evidence_for == _T.c.sr_sop_instance_uid,
                                        _E.c.destination == _T.c.destination,
                                        _E.c.status.in_((OutboxState.PENDING, OutboxState.SENDING))))
_DUE = (select(_T.c.id).where(_T.c.status == OutboxState.PENDING, _T.c.next_attempt <= bindparam("now"),
                              ~_WAITING_EVIDENCE)
        .order_by(_T.c.next_attempt, _T.c.id).limit(bindparam("n")))
_LEASE = dict(status=OutboxState.SENDING, lease_owner=bindparam("owner"), lease_expires=bindparam("expires"))
_DUE_FOR = {False: _DUE, True: _DUE.with_for_update(skip_locked=True)}  # key: is PostgreSQL
_CLAIM = {postgres: update(_T).where(_T.c.id.in_(due), _T.c.status == OutboxState.PENDING)
          .values(**_LEASE).returning(*_T.c)
          for postgres, due in _DUE_FOR.items()}
_MARK_SENT = (update(_T).where(_T.c.id == bindparam("oid"), _T.c.lease_owner == bindparam("owner"))
              .values(status=OutboxState.SENT, sent=bindparam("at"), next_attempt=bindparam("at"),  # commitment due
                      last_error=None, lease_owner=None,
                      lease_expires=None, attempts=_T.c.attempts + 1, last_status=bindparam("rsp_status")))
_RETRY = (update(_T).where(_T.c.id == bindparam("oid"), _T.c.lease_owner == bindparam("owner"))
          .values(status=OutboxState.PENDING, next_attempt=bindparam("due"), last_error=bindparam("error"),
                  lease_owner=None, lease_expires=None, attempts=_T.c.attempts + 1,
                  last_status=bindparam("rsp_status")))


@dataclass(frozen=True)
class Attempt:
    """How one claimed SR's try ended, for ``settle``: accepted (``retry_at`` None) or due again then."""

    item_id: int
    rsp_status: int | None
    retry_at: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Evidence:
    """A file the SR references, to be delivered before it: its SOP Instance UID, path and ``kind``
    (a settings.HeatmapObject value)."""

    sop_instance_uid: str
    path: str
    kind: str


def enqueue(conn: Connection, result_id: int, study_uid: str, sr_sop_instance_uid: str, sr_path: str,
            destinations, now: float, evidence: list[Evidence] | tuple = ()) -> None:
    """One pending row per destination (settings.destinations) for a committed SR and for each of its
    ``evidence`` files (which go first), in the caller's transaction (the scorer's, with its result)."""
    if destinations:
        rows = [dict(result_id=result_id, study_uid=study_uid, sr_sop_instance_uid=e.sop_instance_uid,
                     sr_path=e.path, kind=e.kind, evidence_for=sr_sop_instance_uid, destination=d.name,
                     status=OutboxState.PENDING, attempts=0, next_attempt=now, created=now, **_address(d))
                for d in destinations for e in evidence]
        rows += [dict(result_id=result_id, study_uid=study_uid, sr_sop_instance_uid=sr_sop_instance_uid,
                      sr_path=sr_path, kind=None, evidence_for=None, destination=d.name, status=OutboxState.PENDING,
                      attempts=0, next_attempt=now, created=now, **_address(d))
                 for d in destinations]
        conn.execute(_NEW, rows)


def _address(d) -> dict:
    """The outbox columns that say where a destination is: host/port/AE title, or the STOW-RS url
    (its host and port kept in host/port for the tables; ae_title empty)."""
    if getattr(d, "is_dicomweb", False):
        parts = urlsplit(d.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return dict(host=parts.hostname or "", port=port, ae_title="", url=d.url, commitment=False)
    return dict(host=d.host, port=d.port, ae_title=d.ae_title, url=None,
                commitment=bool(getattr(d, "storage_commitment", False)))


def claim_due(db: Database, owner: str, lease_seconds: float, limit: int = BATCH) -> list[OutboxItem]:
    """Lease up to ``limit`` due rows to ``owner`` in one UPDATE ... RETURNING (PostgreSQL: rows
    picked FOR UPDATE SKIP LOCKED, so concurrent workers take disjoint rows). Core, not the ORM
    session: this runs for every SR. The items returned are detached copies of the claimed rows."""
    now = time.time()
    params = dict(now=now, n=limit, owner=owner, expires=now + lease_seconds)
    with db.write() as conn:
        if db.engine.dialect.update_returning:
            rows = conn.execute(_CLAIM[db.is_postgres], params).mappings().all()
        else:  # SQLite < 3.35: one UPDATE per row, then read them back
            ids = [oid for oid in conn.scalars(_DUE_FOR[db.is_postgres], params).all()
                   if conn.execute(update(_T).where(_T.c.id == oid, _T.c.status == OutboxState.PENDING)
                                   .values(**_LEASE), params).rowcount]
            rows = conn.execute(select(_T).where(_T.c.id.in_(ids))).mappings().all() if ids else []
    return [OutboxItem(**row) for row in sorted(rows, key=lambda r: (r["next_attempt"], r["id"]))]


def mark_sent(db: Database, item_id: int, owner: str, rsp_status: int | None) -> None:
    """Commit one delivered SR as sent (only while ``owner`` still holds its lease)."""
    with db.write() as conn:
        conn.execute(_MARK_SENT, dict(oid=item_id, owner=owner, at=time.time(), rsp_status=rsp_status))


def settle(db: Database, owner: str, attempts: list[Attempt], now: float) -> None:
    """Record, in one transaction, the tries not committed as they were answered: sent, or back to
    pending until ``retry_at`` with ``attempts + 1`` (only rows ``owner`` still holds)."""
    with db.write() as conn:
        for a in attempts:
            if a.retry_at is None:  # accepted, but its commit failed when it was answered
                conn.execute(_MARK_SENT, dict(oid=a.item_id, owner=owner, at=now, rsp_status=a.rsp_status))
            else:
                conn.execute(_RETRY, dict(oid=a.item_id, owner=owner, due=a.retry_at, error=clip(a.error),
                                          rsp_status=a.rsp_status))


def reclaim(conn: Connection, now: float, postgres: bool = False) -> int:
    """sending -> pending for rows whose claimer died (lease expired, or a dead pid on this host),
    and committing -> sent (requested again at once) for commitment requests whose requester died;
    part of the caller's write transaction (store/studies.reclaim_stale). PostgreSQL: rows another
    transaction holds are skipped (``FOR UPDATE SKIP LOCKED``), so workers reclaiming at the same time
    never wait on (or deadlock with) each other or the owner's own commit."""
    count = 0
    committing = select(_T.c.id, _T.c.lease_owner).where(_T.c.status == OutboxState.COMMITTING)
    sending = select(_T.c.id, _T.c.lease_owner, _T.c.lease_expires).where(_T.c.status == OutboxState.SENDING)
    if postgres:
        committing = committing.with_for_update(skip_locked=True)
        sending = sending.with_for_update(skip_locked=True)
    for oid, owner in conn.execute(committing).all():
        if owner_is_dead_here(owner):
            count += conn.execute(_BACK_TO_SENT, dict(oid=oid, owner=owner, due=now, attempts=0,
                                                      error="storage commitment requested by a worker "
                                                            "that stopped; requested again")).rowcount
    for oid, owner, expires in conn.execute(sending).all():
        if (expires or 0) < now or owner_is_dead_here(owner):
            count += conn.execute(update(_T).where(_T.c.id == oid, _T.c.status == OutboxState.SENDING,
                                                   _T.c.lease_owner == owner)
                                  .values(status=OutboxState.PENDING, lease_owner=None, lease_expires=None)).rowcount
    return count


# --- storage commitment -----------------------------------------------------------------------------

#: Why a commitment row went back to sent (``_BACK_TO_SENT``); ``attempts`` is added to the row's count.
_BACK_TO_SENT = (update(_T).where(_T.c.id == bindparam("oid"), _T.c.status == OutboxState.COMMITTING,
                                  _T.c.lease_owner == bindparam("owner"))
                 .values(status=OutboxState.SENT, next_attempt=bindparam("due"), lease_owner=None,
                         lease_expires=None, attempts=_T.c.attempts + bindparam("attempts"),
                         last_error=bindparam("error")))
_COMMIT_DUE = (select(_T.c.id).where(_T.c.status == OutboxState.SENT, _T.c.commitment.is_(True),
                                     _T.c.next_attempt <= bindparam("now"))
               .order_by(_T.c.next_attempt, _T.c.id).limit(bindparam("n")))


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT of Storage Commitment said (built by worker/net/commitment.py):
    the SOP Instance UIDs committed, and the failed ones with their Failure Reason."""

    transaction_uid: str
    committed: tuple[str, ...] = ()
    failed: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """What ``record_commitment`` changed: rows committed, rows to be sent again."""

    committed: int
    resend: int

    @property
    def known(self) -> bool:
        return bool(self.committed or self.resend)


def claim_commitments(db: Database, owner: str, lease_seconds: float, limit: int = BATCH) -> list[OutboxItem]:
    """Lease up to ``limit`` delivered rows whose commitment request is due (sent -> committing;
    no Transaction UID yet: ``begin_commitment`` records it before the request goes out)."""
    now = time.time()
    params = dict(now=now, n=limit)
    with db.engine.connect() as conn:  # a read first: no write transaction (SQLite's lock) when none is due
        if conn.scalars(_COMMIT_DUE, dict(now=now, n=1)).first() is None:
            return []
    due = _COMMIT_DUE.with_for_update(skip_locked=True) if db.is_postgres else _COMMIT_DUE
    with db.write() as conn:
        ids = list(conn.scalars(due, params).all())
        if not ids:
            return []
        conn.execute(update(_T).where(_T.c.id.in_(ids), _T.c.status == OutboxState.SENT)
                     .values(status=OutboxState.COMMITTING, lease_owner=owner, lease_expires=now + lease_seconds,
                             commitment_uid=None))
        rows = conn.execute(select(_T).where(_T.c.id.in_(ids), _T.c.lease_owner == owner,
                                             _T.c.status == OutboxState.COMMITTING)).mappings().all()
    return [OutboxItem(**row) for row in sorted(rows, key=lambda r: (r["next_attempt"], r["id"]))]


def begin_commitment(db: Database, owner: str, item_ids: list[int], transaction_uid: str, timeout: float) -> None:
    """Record the Transaction UID of the request about to go out (before it does: the report can
    arrive before the N-ACTION-RSP has been read) and wait ``timeout`` seconds for its report."""
    now = time.time()
    with db.write() as conn:
        conn.execute(update(_T).where(_T.c.id.in_(item_ids), _T.c.lease_owner == owner,
                                      _T.c.status == OutboxState.COMMITTING)
                     .values(commitment_uid=transaction_uid, commitment_requested=now, lease_expires=now + timeout))


def not_requested(db: Database, owner: str, item_ids: list[int], retry_at: float, error: str) -> None:
    """The request did not go out or was refused: back to sent, requested again at ``retry_at``."""
    with db.write() as conn:
        for oid in item_ids:
            conn.execute(_BACK_TO_SENT, dict(oid=oid, owner=owner, due=retry_at, attempts=1, error=clip(error)))


def record_commitment(db: Database, report: CommitmentReport) -> Recorded:
    """An N-EVENT-REPORT, recorded whoever requested it: its committed SRs committed, its failed ones
    back to pending (sent again at once, then requested again). Only rows waiting on this very
    transaction change; a report for an unknown or superseded one changes nothing (``known`` False)."""
    now = time.time()
    mine = (_T.c.commitment_uid == report.transaction_uid, _T.c.status == OutboxState.COMMITTING)
    committed = resend = 0
    with db.write() as conn:
        if report.committed:
            committed = conn.execute(update(_T).where(*mine, _T.c.sr_sop_instance_uid.in_(report.committed))
                                     .values(status=OutboxState.COMMITTED, committed=now, lease_owner=None,
                                             lease_expires=None, last_error=None)).rowcount
        for uid, reason in report.failed.items():
            why = f"storage commitment failed (Failure Reason 0x{reason:04X})" if reason is not None else \
                "storage commitment failed (no Failure Reason)"
            resend += conn.execute(update(_T).where(*mine, _T.c.sr_sop_instance_uid == uid)
                                   .values(status=OutboxState.PENDING, next_attempt=now, lease_owner=None,
                                           lease_expires=None, commitment_uid=None, last_error=why,
                                           attempts=_T.c.attempts + 1)).rowcount
    return Recorded(committed, resend)


def expire_commitments(db: Database, now: float, backoff) -> int:
    """committing -> sent for requests without a report past their deadline (lease_expires), due
    again after ``backoff(attempts + 1)``; those of a requester that died on this host at once."""
    rows = []
    with db.engine.connect() as conn:
        rows = conn.execute(select(_T.c.id, _T.c.lease_owner, _T.c.lease_expires, _T.c.attempts,
                                   _T.c.commitment_uid, _T.c.commitment_requested)
                            .where(_T.c.status == OutboxState.COMMITTING)).all()
    late = [r for r in rows if (r.lease_expires or 0) < now or owner_is_dead_here(r.lease_owner)]
    if not late:
        return 0
    count = 0
    with db.write() as conn:
        for r in late:
            waited = now - (r.commitment_requested or now)
            error = (f"no storage commitment report for transaction {r.commitment_uid} after {waited:.0f} s; "
                     "requested again") if r.commitment_uid else "storage commitment request interrupted"
            count += conn.execute(_BACK_TO_SENT, dict(oid=r.id, owner=r.lease_owner, due=now + backoff(r.attempts + 1),
                                                      attempts=1, error=error)).rowcount
    return count
