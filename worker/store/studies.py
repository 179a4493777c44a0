"""Study queue transitions: receiving -> ready (quiet period), ready -> scoring (claim), finish/release.

Claims are safe with several workers on one PostgreSQL: candidates are selected with
``FOR UPDATE SKIP LOCKED`` and each is taken with a conditional UPDATE (status='ready'), so a study
has exactly one claimer. On SQLite every write transaction is BEGIN IMMEDIATE (serialised).
A claim is a lease (owner + expiry); db.reclaim_stale() returns studies of dead claimers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, select, update

from . import db as dbm
from .db import Database, Instance, Study

MAX_ATTEMPTS = 3


@dataclass
class ClaimedStudy:
    id: int
    study_uid: str
    accession: str | None
    n_instances: int
    revision: int
    claimed_at: float


def _promotion(quiet_seconds: float, now: float):
    """The UPDATE receiving -> ready for studies with no new instance for ``quiet_seconds``."""
    return (update(Study).where(Study.status == dbm.STUDY_RECEIVING, Study.last_received <= now - quiet_seconds)
            .values(status=dbm.STUDY_READY, updated=now))


def promote_quiet(db: Database, quiet_seconds: float, now: float | None = None) -> int:
    """receiving -> ready for studies with no new instance for ``quiet_seconds``."""
    now = time.time() if now is None else now
    with db.session() as s, s.begin():
        return s.execute(_promotion(quiet_seconds, now)).rowcount


def next_due(db: Database, quiet_seconds: float) -> float | None:
    """When (epoch s) the earliest receiving study's quiet period ends; None when none is receiving."""
    with db.session() as s:
        last = s.scalar(select(func.min(Study.last_received)).where(Study.status == dbm.STUDY_RECEIVING))
    return None if last is None else last + quiet_seconds


def claim_ready(db: Database, owner: str, limit: int, lease_seconds: float,
                quiet_seconds: float | None = None) -> list[ClaimedStudy]:
    """Take up to ``limit`` ready studies (oldest first) for ``owner``.

    With ``quiet_seconds``, studies whose quiet period is over are promoted to ready first, in the
    same transaction (one commit per scorer pass instead of two).
    """
    now = time.time()
    claimed: list[ClaimedStudy] = []
    with db.session() as s, s.begin():
        if quiet_seconds is not None:
            s.execute(_promotion(quiet_seconds, now))
        query = (select(Study.id, Study.study_uid, Study.accession, Study.n_instances, Study.revision)
                 .where(Study.status == dbm.STUDY_READY).order_by(Study.last_received).limit(limit))
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        for row in s.execute(query).all():
            # Conditional: on PostgreSQL the row is locked (SKIP LOCKED), on SQLite the transaction is
            # IMMEDIATE, so the values just read are the ones the update sees.
            taken = s.execute(update(Study).where(Study.id == row.id, Study.status == dbm.STUDY_READY)
                              .values(status=dbm.STUDY_SCORING, lease_owner=owner,
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


def release(db: Database, owner: str, study_ids: list[int], error: str) -> None:
    """Give claimed studies back after a batch-level failure (failed after MAX_ATTEMPTS)."""
    now = time.time()
    with db.session() as s, s.begin():
        for sid in study_ids:
            study = s.get(Study, sid)
            if study is None or study.status != dbm.STUDY_SCORING or study.lease_owner != owner:
                continue
            study.status = dbm.STUDY_FAILED if study.attempts >= MAX_ATTEMPTS else dbm.STUDY_READY
            study.error = error[:2000]
            study.lease_owner = study.lease_expires = None
            study.updated = now


def renew(db: Database, owner: str, study_ids: list[int], lease_seconds: float) -> None:
    with db.session() as s, s.begin():
        s.execute(update(Study).where(Study.id.in_(study_ids), Study.lease_owner == owner,
                                      Study.status == dbm.STUDY_SCORING)
                  .values(lease_expires=time.time() + lease_seconds))
