"""The worker's database: every arrow of a study's journey is a committed state here.

SQLAlchemy 2 ORM; any URL. SQLite (the default) runs in WAL mode with a busy timeout so the
network threads, the scorer and the outbox sender can write concurrently; PostgreSQL
(``postgresql+psycopg://``) lets several workers share one queue (claims use
``FOR UPDATE SKIP LOCKED`` plus a conditional UPDATE, so exactly one worker wins a study).

States
    studies.status : receiving -> ready -> scoring -> done | no_eligible_images | failed
                     (a late new instance sends done/no_eligible_images back to receiving)
    outbox.status  : pending -> sending -> sent   (a failed try goes back to pending with backoff)
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import (Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

STUDY_RECEIVING = "receiving"
STUDY_READY = "ready"
STUDY_SCORING = "scoring"
STUDY_DONE = "done"
STUDY_NO_ELIGIBLE = "no_eligible_images"
STUDY_FAILED = "failed"
STUDY_STATES = (STUDY_RECEIVING, STUDY_READY, STUDY_SCORING, STUDY_DONE, STUDY_NO_ELIGIBLE, STUDY_FAILED)

OUTBOX_PENDING = "pending"
OUTBOX_SENDING = "sending"
OUTBOX_SENT = "sent"
OUTBOX_STATES = (OUTBOX_PENDING, OUTBOX_SENDING, OUTBOX_SENT)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24), index=True, default=STUDY_RECEIVING)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)      # grows with every new instance
    scored_instances: Mapped[int] = mapped_column(Integer, default=0)  # n_instances when last claimed
    revision: Mapped[int] = mapped_column(Integer, default=0)         # completed scorings (SR revision)
    first_received: Mapped[float] = mapped_column(Float)
    last_received: Mapped[float] = mapped_column(Float, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), ForeignKey("studies.study_uid"), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    received: Mapped[float] = mapped_column(Float)
    eligible: Mapped[bool] = mapped_column(Boolean)          # header check at receive; decode may revoke
    reason: Mapped[str | None] = mapped_column(String(64))   # why not eligible (short code)
    detail: Mapped[str | None] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column(Float)
    frame: Mapped[int | None] = mapped_column(Integer)


class Result(Base):
    """One per (study, model): re-scoring a study after late arrivals updates it (revision + 1)."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_uid", "model_uid", name="uq_result_study_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), ForeignKey("studies.study_uid"), index=True)
    accession: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24))           # done | no_eligible_images | failed
    revision: Mapped[int] = mapped_column(Integer, default=1)
    probability: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(32))
    positive: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_uid: Mapped[str] = mapped_column(String(64))
    n_instances: Mapped[int] = mapped_column(Integer)
    n_scored: Mapped[int] = mapped_column(Integer)
    best_instance_uid: Mapped[str | None] = mapped_column(String(64))
    reasons: Mapped[str | None] = mapped_column(Text)         # JSON {reason: count} of skipped images
    error: Mapped[str | None] = mapped_column(Text)
    decode_s: Mapped[float] = mapped_column(Float, default=0.0)
    inference_s: Mapped[float] = mapped_column(Float, default=0.0)
    sr_s: Mapped[float] = mapped_column(Float, default=0.0)
    total_s: Mapped[float] = mapped_column(Float, default=0.0)
    device: Mapped[str | None] = mapped_column(String(32))
    sr_path: Mapped[str | None] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)


class OutboxItem(Base):
    """One SR file to one destination; unique per SR instance and destination."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sr_sop_instance_uid", "destination", name="uq_outbox_sr_dest"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(Integer, ForeignKey("results.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sr_path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True, default=OUTBOX_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
    sent: Mapped[float | None] = mapped_column(Float)


class _WriterTurns:
    """Turn-taking among this process's threads for SQLite's one write lock.

    Every transaction here is BEGIN IMMEDIATE. While another connection holds the lock, SQLite's
    busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between retries, so a C-STORE queued behind
    a scorer commit (one fsync, a few ms) lost 8-20 ms. Our threads queue on a Python lock instead,
    handed over the moment the holder's COMMIT/ROLLBACK returns. Waiting is bounded by the busy
    timeout, after which SQLite's own busy handling decides (as before); other processes (the CLI)
    are arbitrated by SQLite as before.
    """

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._holder: object | None = None  # the DBAPI connection whose transaction holds the turn
        self._timeout = timeout_s

    def take(self, dbapi_conn: object) -> None:
        if self._lock.acquire(timeout=self._timeout):
            self._holder = dbapi_conn

    def give_back(self, dbapi_conn: object) -> None:
        raw = getattr(dbapi_conn, "dbapi_connection", dbapi_conn)  # the pool passes its proxy
        if self._holder is not None and self._holder is raw:
            self._holder = None
            self._lock.release()


def make_engine(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """Engine for ``url``; SQLite gets WAL, a busy timeout and a private (0600) file."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)

        turns = _WriterTurns(busy_timeout_ms / 1000)
        dialect = engine.dialect
        for name in ("do_commit", "do_rollback", "do_close"):  # the turn ends when the transaction does
            def ending(dbapi_conn, _real=getattr(dialect, name)):
                try:
                    _real(dbapi_conn)
                finally:
                    turns.give_back(dbapi_conn)
            setattr(dialect, name, ending)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            # IMMEDIATE: take the write lock up front, so read-then-write transactions wait
            # (busy_timeout) instead of failing with SQLITE_BUSY when another writer committed.
            raw = conn.connection.dbapi_connection
            turns.take(raw)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                turns.give_back(raw)
                raise
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    return engine


class Database:
    """Engine + session factory; creates the tables on start."""

    def __init__(self, url: str, busy_timeout_ms: int = 30000, create: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        if create:
            Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()


def new_owner() -> str:
    """Lease owner id: host, pid and a random token (a restarted pid is a different owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True when ``owner`` was a process on this host that no longer exists (reclaim at once)."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reclaim_stale(db: Database, now: float | None = None) -> int:
    """Put studies/outbox items whose claimer died (lease expired or dead local pid) back in the queue."""
    now = time.time() if now is None else now
    count = 0
    with db.session() as s, s.begin():
        rows = s.execute(select(Study.id, Study.lease_owner, Study.lease_expires)
                         .where(Study.status == STUDY_SCORING)).all()
        for sid, owner, expires in rows:
            if (expires or 0) < now or owner_is_dead_here(owner):
                count += s.execute(update(Study).where(Study.id == sid, Study.status == STUDY_SCORING,
                                                       Study.lease_owner == owner)
                                   .values(status=STUDY_READY, lease_owner=None, lease_expires=None,
                                           updated=now)).rowcount
        rows = s.execute(select(OutboxItem.id, OutboxItem.lease_owner, OutboxItem.lease_expires)
                         .where(OutboxItem.status == OUTBOX_SENDING)).all()
        for oid, owner, expires in rows:
            if (expires or 0) < now or owner_is_dead_here(owner):
                count += s.execute(update(OutboxItem).where(OutboxItem.id == oid,
                                                            OutboxItem.status == OUTBOX_SENDING,
                                                            OutboxItem.lease_owner == owner)
                                   .values(status=OUTBOX_PENDING, lease_owner=None, lease_expires=None)
                                   ).rowcount
    return count
