"""The study lifecycle: the only code that changes a study's state, one named function per transition.

    from                          event             function         to
    (none)                        arrival           record_arrival   receiving
    receiving                     arrival           record_arrival   receiving (its quiet period restarts)
    ready                         arrival           record_arrival   receiving (its quiet period restarts)
    scoring                       arrival           record_arrival   scoring (conclude sees the new instance)
    done | no_eligible | failed   arrival           record_arrival   receiving (re-opened for a new SR revision),
                                                                     or unchanged with the instance recorded as
                                                                     late_arrival (studies.rescore_late_arrivals
                                                                     = false)
    receiving                     quiet             promote_quiet    ready (quiet_seconds without a new instance)
    ready                         claim             claim_ready      scoring (leased to one owner)
    scoring                       renew             renew            scoring (lease extended)
    scoring                       conclude          conclude         done | no_eligible_images | failed (the
                                                                     scorer's verdict), or receiving when an
                                                                     instance arrived (or was replaced) while
                                                                     it was scored
    scoring                       release           release          ready, or failed after MAX_ATTEMPTS claims
    scoring                       reclaim           reclaim_stale    ready (lease expired, or its claimer's
                                                                     process is gone)

An instance that replaces an unusable stored copy of itself (worker/receiver.py: same SOP Instance
UID, different bytes, the stored copy's pixels did not decode) is an arrival too (``record_arrival``
with ``replacing``): the same transitions, but it is not counted again; while the study is scoring,
it marks the claim stale (``scored_instances = REPLACED_WHILE_SCORING``) so that conclude sends the
study back to receiving, as for an instance that arrived meanwhile.

``TRANSITIONS`` is the same table as data. Any other (state, event) is refused: the study is left as
it is (a claim takes only ready studies; renew, conclude and release act only on studies still
scoring under the caller's lease).

Several workers on one PostgreSQL (docs/deployment.md): claims select candidates ``FOR UPDATE SKIP
LOCKED`` and take each with a conditional UPDATE (status='ready'), so a study has exactly one
claimer; the first instances of a new study arriving at two workers at once make one row (``INSERT
... ON CONFLICT DO NOTHING``, then the row read again, locked); every arrival locks its study row, so
promotion, claims and conclude see it; promotion and reclaim skip rows other transactions hold, so
two workers never wait on (or deadlock over) each other's rows. On SQLite every write transaction is
BEGIN IMMEDIATE (serialised).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection, bindparam, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from . import outbox
from .db import Database, Instance, Study, StudyState, clip, owner_is_dead_here

log = logging.getLogger("cxr_worker.studies")

MAX_ATTEMPTS = 3
#: ``studies.scored_instances`` of a scoring study one of whose instances was replaced since the claim.
REPLACED_WHILE_SCORING = -1


class Event(StrEnum):
    """What happens to a study (the middle column of the table above)."""

    ARRIVAL = "arrival"
    QUIET = "quiet"
    CLAIM = "claim"
    RENEW = "renew"
    CONCLUDE = "conclude"
    RELEASE = "release"
    RECLAIM = "reclaim"


_S = StudyState
#: The states a study reached by one scoring; an arrival re-opens them (or is recorded as late).
SCORED = (_S.DONE, _S.NO_ELIGIBLE, _S.FAILED)

#: (state, event) -> the states it may lead to; a pair not listed is refused.
TRANSITIONS: dict[tuple[StudyState, Event], tuple[StudyState, ...]] = {
    (_S.RECEIVING, Event.ARRIVAL): (_S.RECEIVING,),
    (_S.READY, Event.ARRIVAL): (_S.RECEIVING,),
    (_S.SCORING, Event.ARRIVAL): (_S.SCORING,),
    **{(scored, Event.ARRIVAL): (_S.RECEIVING, scored) for scored in SCORED},
    (_S.RECEIVING, Event.QUIET): (_S.READY,),
    (_S.READY, Event.CLAIM): (_S.SCORING,),
    (_S.SCORING, Event.RENEW): (_S.SCORING,),
    (_S.SCORING, Event.CONCLUDE): (*SCORED, _S.RECEIVING),
    (_S.SCORING, Event.RELEASE): (_S.READY, _S.FAILED),
    (_S.SCORING, Event.RECLAIM): (_S.READY,),
}

#: How an instance is recorded when it arrives after its study was scored and not re-opened.
LATE_ARRIVAL = ("late_arrival", "arrived after the study was scored (studies.rescore_late_arrivals=false)")


@dataclass
class ClaimedStudy:
    id: int
    study_uid: str
    accession: str | None
    n_instances: int
    revision: int
    claimed_at: float


# -- receiving: on every C-STORE ------------------------------------------------------------------------
#: Built once: SQLAlchemy then only binds values (building a statement per call with its values cost
#: ~0.6 ms of Python per instance, more than SQLite's commit).
_STUDY_ROW = select(Study.id, Study.status).where(Study.study_uid == bindparam("uid")).with_for_update()
_NEW_STUDY = insert(Study)
#: PostgreSQL: the first instances of one study arriving at two workers at once both find no row; the
#: second INSERT waits for the first to commit and then inserts nothing (instead of a unique violation
#: that would abort the receiver's transaction), and the row is read again, locked.
_NEW_STUDY_PG = pg_insert(Study).on_conflict_do_nothing(index_elements=[Study.study_uid]).returning(Study.id)
_TOUCH_STUDY = (update(Study).where(Study.id == bindparam("sid"))
                .values(n_instances=Study.n_instances + 1, last_received=bindparam("now"), updated=bindparam("now"),
                        status=bindparam("new_status")))
_REPLACED_IN_STUDY = (update(Study).where(Study.id == bindparam("sid"))
                      .values(last_received=bindparam("now"), updated=bindparam("now"), status=bindparam("new_status"),
                              scored_instances=case((Study.status == StudyState.SCORING, REPLACED_WHILE_SCORING),
                                                    else_=Study.scored_instances)))


def record_arrival(conn: Connection, study_uid: str, accession: str | None, now: float,
                   rescore_late: bool, replacing: bool = False) -> tuple[str, str] | None:
    """A new instance of ``study_uid``, in the receiver's transaction (before its instance row): the
    study row is created, or counted and moved by the arrival transitions. Returns (reason, detail)
    to record the instance as not eligible with (LATE_ARRIVAL), or None.

    ``replacing``: the instance replaces an unusable stored copy of itself (its row is rewritten): the
    same transitions, not counted again, and a scoring study's claim is marked stale."""
    study = conn.execute(_STUDY_ROW, {"uid": study_uid}).first()
    if study is None and replacing:
        raise ValueError(f"study {study_uid} of a replaced instance does not exist")
    if study is None:
        values = dict(study_uid=study_uid, accession=accession, status=StudyState.RECEIVING, n_instances=1,
                      first_received=now, last_received=now, updated=now, attempts=0, revision=0, scored_instances=0)
        if conn.dialect.name != "postgresql":  # SQLite: the write transaction is IMMEDIATE, nobody races it
            conn.execute(_NEW_STUDY, values)
            return None
        if conn.execute(_NEW_STUDY_PG, values).first() is not None:
            return None
        # another worker created it meanwhile (committed: READ COMMITTED reads it in this statement)
        study = conn.execute(_STUDY_ROW, {"uid": study_uid}).first()
    status, late = study.status, None
    if status in SCORED:
        if rescore_late:
            status = StudyState.RECEIVING
            log.info("study %s: new instance after scoring; re-opened for a new SR revision", study_uid)
        else:
            late = LATE_ARRIVAL
    elif status == StudyState.READY:
        status = StudyState.RECEIVING  # restart the quiet period
    conn.execute(_REPLACED_IN_STUDY if replacing else _TOUCH_STUDY, {"sid": study.id, "now": now, "new_status": status})
    return late


# -- the queue: the scorer loop ---------------------------------------------------------------------------
def _promotion(quiet_seconds: float, now: float, postgres: bool = False):
    """The UPDATE receiving -> ready for studies with no new instance for ``quiet_seconds``.

    PostgreSQL: only rows nobody else has locked (``FOR UPDATE SKIP LOCKED``): a row locked by an
    arrival is getting a new instance (its quiet period restarts), one locked by another worker's
    promotion is being promoted; and two workers' promotions never wait on each other's rows, so they
    cannot deadlock."""
    due = (Study.status == StudyState.RECEIVING, Study.last_received <= now - quiet_seconds)
    query = update(Study).where(*due)
    if postgres:
        query = update(Study).where(Study.id.in_(select(Study.id).where(*due).with_for_update(skip_locked=True)
                                                 .scalar_subquery()), Study.status == StudyState.RECEIVING)
    return query.values(status=StudyState.READY, updated=now)


def promote_quiet(db: Database, quiet_seconds: float, now: float | None = None) -> int:
    """receiving -> ready for studies with no new instance for ``quiet_seconds``."""
    now = time.time() if now is None else now
    with db.write() as conn:
        return conn.execute(_promotion(quiet_seconds, now, db.is_postgres)).rowcount


def next_due(db: Database, quiet_seconds: float) -> float | None:
    """When (epoch s) the earliest receiving study's quiet period ends; None when none is receiving."""
    with db.engine.connect() as conn:
        last = conn.scalar(select(func.min(Study.last_received)).where(Study.status == StudyState.RECEIVING))
    return None if last is None else last + quiet_seconds


def claim_ready(db: Database, owner: str, limit: int, lease_seconds: float,
                quiet_seconds: float | None = None) -> list[ClaimedStudy]:
    """ready -> scoring: lease up to ``limit`` ready studies (oldest first) to ``owner``.

    With ``quiet_seconds``, studies whose quiet period is over are promoted to ready first, in the
    same transaction (one commit per scorer pass instead of two).
    """
    now = time.time()
    claimed: list[ClaimedStudy] = []
    with db.write() as conn:
        if quiet_seconds is not None:
            conn.execute(_promotion(quiet_seconds, now, db.is_postgres))
        query = (select(Study.id, Study.study_uid, Study.accession, Study.n_instances, Study.revision)
                 .where(Study.status == StudyState.READY).order_by(Study.last_received).limit(limit))
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        for row in conn.execute(query).all():
            # Conditional: on PostgreSQL the row is locked (SKIP LOCKED), on SQLite the transaction is
            # IMMEDIATE, so the values just read are the ones the update sees.
            taken = conn.execute(update(Study).where(Study.id == row.id, Study.status == StudyState.READY)
                                 .values(status=StudyState.SCORING, lease_owner=owner,
                                         lease_expires=now + lease_seconds, attempts=Study.attempts + 1,
                                         scored_instances=Study.n_instances, updated=now)).rowcount
            if taken:
                claimed.append(ClaimedStudy(row.id, row.study_uid, row.accession, row.n_instances,
                                            row.revision, now))
    return claimed


def instances_of_many(db: Database, study_uids: list[str]) -> dict[str, list[Instance]]:
    """Instances of several studies in one query, each study's in arrival order."""
    found: dict[str, list[Instance]] = {uid: [] for uid in study_uids}
    if not study_uids:
        return found
    with db.session() as s:
        for inst in s.scalars(select(Instance).where(Instance.study_uid.in_(study_uids))
                              .order_by(Instance.received, Instance.id)).all():
            found[inst.study_uid].append(inst)
    return found


def _leased(ids, owner: str):
    """The studies of ``ids`` still scoring under ``owner``'s lease."""
    return (Study.id.in_(ids), Study.status == StudyState.SCORING, Study.lease_owner == owner)


def renew(db: Database, owner: str, study_ids: list[int], lease_seconds: float) -> None:
    """scoring -> scoring: extend ``owner``'s lease on the studies it still holds."""
    with db.write() as conn:
        conn.execute(update(Study).where(*_leased(study_ids, owner))
                     .values(lease_expires=time.time() + lease_seconds))


def release(db: Database, owner: str, study_ids: list[int], error: str) -> None:
    """scoring -> ready after a failure (the next pass tries again), or failed after MAX_ATTEMPTS
    claims; only studies ``owner`` still holds."""
    with db.write() as conn:
        conn.execute(update(Study).where(*_leased(study_ids, owner))
                     .values(status=case((Study.attempts >= MAX_ATTEMPTS, StudyState.FAILED), else_=StudyState.READY),
                             error=clip(error), lease_owner=None, lease_expires=None, updated=time.time()))


_LEASED_ROW = (select(Study.status, Study.lease_owner, Study.n_instances, Study.scored_instances)
               .where(Study.id == bindparam("sid"))
               .with_for_update())
_CONCLUDE = (update(Study).where(Study.id == bindparam("sid"))
             .values(status=bindparam("final"), revision=bindparam("rev"), error=bindparam("err"),
                     lease_owner=None, lease_expires=None, updated=bindparam("now")))


def conclude(conn: Connection, owner: str, study: ClaimedStudy, verdict: StudyState, revision: int,
             error: str | None, now: float) -> StudyState | None:
    """scoring -> the scorer's ``verdict`` (done, no_eligible_images or failed), in the caller's
    transaction with the result it records; receiving instead when instances arrived since the claim
    (it is scored again). Returns the state reached, or None when ``owner`` no longer holds the
    lease (the study is left alone and the result must be discarded)."""
    if verdict not in SCORED:
        raise ValueError(f"not a verdict: {verdict!r}")
    row = conn.execute(_LEASED_ROW, {"sid": study.id}).first()
    if row is None or row.status != StudyState.SCORING or row.lease_owner != owner:
        return None
    changed = row.n_instances != study.n_instances or row.scored_instances == REPLACED_WHILE_SCORING
    final = StudyState.RECEIVING if changed else verdict
    conn.execute(_CONCLUDE, dict(sid=study.id, final=final, rev=revision, err=error, now=now))
    return final


def reclaim_stale(db: Database, now: float | None = None) -> int:
    """scoring -> ready for studies whose claimer died (lease expired, or a dead pid on this host:
    store/db.owner_is_dead_here), and the same for outbox rows (store/outbox.reclaim), in one
    transaction; returns how many.

    Several workers run this (every 5 s each): on PostgreSQL the scoring rows are read ``FOR UPDATE
    SKIP LOCKED``, so a row another transaction holds (its owner committing its result, another
    worker reclaiming it) is left to that transaction, and no two reclaims wait on each other."""
    now = time.time() if now is None else now
    count = 0
    scoring = select(Study.id, Study.lease_owner, Study.lease_expires).where(Study.status == StudyState.SCORING)
    if db.is_postgres:
        scoring = scoring.with_for_update(skip_locked=True)
    with db.write() as conn:
        for sid, owner, expires in conn.execute(scoring).all():
            if (expires or 0) < now or owner_is_dead_here(owner):
                count += conn.execute(update(Study).where(Study.id == sid, Study.status == StudyState.SCORING,
                                                          Study.lease_owner == owner)
                                      .values(status=StudyState.READY, lease_owner=None, lease_expires=None,
                                              updated=now)).rowcount
        count += outbox.reclaim(conn, now, db.is_postgres)
    return count
