"""Outbox rows: one SR file for one destination, and the only code that changes their state.

    (none)  --enqueue--> pending               one row per destination of a committed SR
    pending --claim_due--> sending --mark_sent / settle(accepted)--> sent
    sending --settle(retry_at)--> pending      a failed try; worker/outbox_loop.py computes the backoff
    sending --reclaim--> pending               the claimer's lease expired or its process is gone

A claimed row is changed only while its claimer (``owner``) still holds the lease.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, insert, select, update

from .db import Database, OutboxItem, OutboxState, clip, owner_is_dead_here

BATCH = 32

# The per-SR statements, built once: a Core statement built per call cost ~0.25 ms of CPU more
# (construction and cache key) than executing a prebuilt one.
_T = OutboxItem.__table__
_NEW = insert(_T)
_DUE = (select(_T.c.id).where(_T.c.status == OutboxState.PENDING, _T.c.next_attempt <= bindparam("now"))
        .order_by(_T.c.next_attempt, _T.c.id).limit(bindparam("n")))
_LEASE = dict(status=OutboxState.SENDING, lease_owner=bindparam("owner"), lease_expires=bindparam("expires"))
_DUE_FOR = {False: _DUE, True: _DUE.with_for_update(skip_locked=True)}  # key: is PostgreSQL
_CLAIM = {postgres: update(_T).where(_T.c.id.in_(due), _T.c.status == OutboxState.PENDING)
          .values(**_LEASE).returning(*_T.c)
          for postgres, due in _DUE_FOR.items()}
_MARK_SENT = (update(_T).where(_T.c.id == bindparam("oid"), _T.c.lease_owner == bindparam("owner"))
              .values(status=OutboxState.SENT, sent=bindparam("at"), last_error=None, lease_owner=None,
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


def enqueue(conn: Connection, result_id: int, study_uid: str, sr_sop_instance_uid: str, sr_path: str,
            destinations, now: float) -> None:
    """One pending row per destination (settings.destinations) for a committed SR, in the caller's
    transaction (the scorer's, with its result)."""
    if destinations:
        conn.execute(_NEW, [dict(result_id=result_id, study_uid=study_uid, sr_sop_instance_uid=sr_sop_instance_uid,
                                 sr_path=sr_path, destination=d.name, host=d.host, port=d.port, ae_title=d.ae_title,
                                 status=OutboxState.PENDING, attempts=0, next_attempt=now, created=now)
                            for d in destinations])


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
    """sending -> pending for rows whose claimer died (lease expired, or a dead pid on this host);
    part of the caller's write transaction (store/studies.reclaim_stale). PostgreSQL: rows another
    transaction holds are skipped (``FOR UPDATE SKIP LOCKED``), so workers reclaiming at the same time
    never wait on (or deadlock with) each other or the owner's own commit."""
    count = 0
    sending = select(_T.c.id, _T.c.lease_owner, _T.c.lease_expires).where(_T.c.status == OutboxState.SENDING)
    if postgres:
        sending = sending.with_for_update(skip_locked=True)
    for oid, owner, expires in conn.execute(sending).all():
        if (expires or 0) < now or owner_is_dead_here(owner):
            count += conn.execute(update(_T).where(_T.c.id == oid, _T.c.status == OutboxState.SENDING,
                                                   _T.c.lease_owner == owner)
                                  .values(status=OutboxState.PENDING, lease_owner=None, lease_expires=None)).rowcount
    return count
