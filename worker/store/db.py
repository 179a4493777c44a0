"""The worker's database: every arrow of a study's journey is a committed state here.

SQLAlchemy 2; any URL. SQLite (the default) runs in WAL mode with a busy timeout so the network
threads, the scorer and the outbox sender can write concurrently; PostgreSQL
(``postgresql+psycopg://``) lets several workers share one queue (claims use
``FOR UPDATE SKIP LOCKED`` plus a conditional UPDATE, so exactly one worker wins a study).

Every writing transaction is ``Database.write()``; the states are the two StrEnums below (their
values are what the ``status`` columns hold). Which transitions exist, and the only code that
makes them: store/studies.py for studies, store/outbox.py for outbox rows.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from enum import StrEnum
from pathlib import Path

from sqlalchemy import (Boolean, Connection, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint, create_engine, event, inspect, text)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class StudyState(StrEnum):
    """``studies.status`` (and ``results.status``, which holds the verdict: done, no_eligible_images, failed)."""

    RECEIVING = "receiving"
    READY = "ready"
    SCORING = "scoring"
    DONE = "done"
    NO_ELIGIBLE = "no_eligible_images"
    FAILED = "failed"


class OutboxState(StrEnum):
    """``outbox.status`` (store/outbox.py has the transitions)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"              # delivered (C-STORE Success / STOW-RS stored); with storage commitment:
                               # delivered, its commitment request due at next_attempt
    COMMITTING = "committing"  # storage commitment requested (commitment_uid), the N-EVENT-REPORT awaited
    COMMITTED = "committed"    # the destination reported it has taken responsibility for the SR

    @classmethod
    def delivered(cls) -> tuple["OutboxState", ...]:
        """The states of an SR the destination has accepted."""
        return (cls.SENT, cls.COMMITTING, cls.COMMITTED)


#: Longest error/detail text kept in a column (an exception's message can be any length).
TEXT_LIMIT = 2000


def clip(text: str) -> str:
    """``text`` cut to the length an error/detail column keeps."""
    return text[:TEXT_LIMIT]


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24), index=True, default=StudyState.RECEIVING)
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
    probability: Mapped[float | None] = mapped_column(Float)   # calibrated (see Result.probability)
    frame: Mapped[int | None] = mapped_column(Integer)
    ood_score: Mapped[float | None] = mapped_column(Float)     # out-of-distribution score; NULL = no detector
    # What the SR reads from this image, kept at receive time (worker.sr.pack_source, a few hundred
    # bytes); NULL for rows stored before the column existed: the SR then reads the file.
    sr_attributes: Mapped[bytes | None] = mapped_column(LargeBinary)


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
    # intended use and calibration (#10). NULL in rows from before: read as assessed when probability
    # is set. probability is calibrated, raw_probability the model's own sigmoid; threshold is on the
    # calibrated scale. ood_score: the assessed image's (the one the probability is from), else the
    # study's most unusual image's; ood_threshold the detector's (NULL = no detector).
    assessed: Mapped[bool | None] = mapped_column(Boolean)
    not_assessed_reasons: Mapped[str | None] = mapped_column(Text)   # JSON list of codes, "[]" when assessed
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood_threshold: Mapped[float | None] = mapped_column(Float)
    raw_probability: Mapped[float | None] = mapped_column(Float)
    outside_intended_use: Mapped[str | None] = mapped_column(Text)   # JSON list (outside = flag), else NULL


class OutboxItem(Base):
    """One DICOM file to one destination, unique per SOP instance and destination: an SR, or (``kind``
    set) a heatmap object the SR references, sent before it (``evidence_for`` = the SR's SOP Instance
    UID; store/outbox.py claims no SR while an object it waits for is undelivered to that destination).
    The ``sr_*`` column names predate the objects: they hold the row's own file and SOP Instance UID."""

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
    status: Mapped[str] = mapped_column(String(16), index=True, default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
    sent: Mapped[float | None] = mapped_column(Float)
    # Added after the first release (``_add_new_columns``; NULL in older rows = a DIMSE row, no commitment):
    url: Mapped[str | None] = mapped_column(Text)                  # a dicomweb destination's STOW-RS base URL
    commitment: Mapped[bool | None] = mapped_column(Boolean)       # storage commitment requested for this row
    commitment_uid: Mapped[str | None] = mapped_column(String(64))  # Transaction UID of the request in flight
    commitment_requested: Mapped[float | None] = mapped_column(Float)
    committed: Mapped[float | None] = mapped_column(Float)
    kind: Mapped[str | None] = mapped_column(String(16))           # NULL = the SR; else a heatmap.objects value
    evidence_for: Mapped[str | None] = mapped_column(String(64), index=True)  # the SR this object goes before


class _WriterTurns:
    """Turn-taking among this process's threads for SQLite's one write lock.

    Why: a write transaction begins IMMEDIATE (it takes SQLite's write lock up front). While another
    connection holds that lock, SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between
    retries, so a C-STORE queued behind a scorer commit (one fsync, a few ms) lost 8-20 ms. Our
    threads queue on a Python lock instead, handed over the moment the holder's COMMIT/ROLLBACK
    returns. Waiting is bounded by the busy timeout, after which SQLite's own busy handling decides;
    other processes (the CLI) are arbitrated by SQLite. The turn is a context manager around the
    transaction (``Database.write``), so it ends exactly when the transaction does, with no hook
    into SQLAlchemy's dialect; reads take no turn (a WAL snapshot waits for no writer).
    """

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._timeout = timeout_s

    @contextmanager
    def turn(self) -> Iterator[None]:
        taken = self._lock.acquire(timeout=self._timeout)
        try:
            yield
        finally:
            if taken:
                self._lock.release()


#: PostgreSQL advisory lock key held while the schema is created (any constant; "cxrw" in ASCII).
SCHEMA_LOCK = 0x63787277

#: Execution option of the connections ``Database.write`` opens: SQLite begins them IMMEDIATE.
_WRITE = "cxr_write"


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

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            # A write takes the write lock up front (IMMEDIATE), so a read-then-write transaction waits
            # (busy_timeout) instead of failing with SQLITE_BUSY when another writer committed meanwhile.
            # A read is a deferred BEGIN: a WAL snapshot, which waits for no writer.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    return engine


class Database:
    """Engine + session factory; creates the tables on start.

    ``write()`` is the one way to change the database; ``session()`` and ``engine.connect()`` are for
    reading (on SQLite they begin a deferred transaction, where a write after a read can fail with
    SQLITE_BUSY instead of waiting for the writer before it).
    """

    def __init__(self, url: str, busy_timeout_ms: int = 30000, create: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        self._writer = self.engine.execution_options(**{_WRITE: True})
        self._turn = (_WriterTurns(busy_timeout_ms / 1000).turn if self.engine.dialect.name == "sqlite"
                      else nullcontext)  # PostgreSQL locks rows, not the database: no turns
        if create:
            with self.write() as conn:
                if self.is_postgres:
                    # workers starting together: CREATE TABLE is not IF NOT EXISTS-safe against a
                    # concurrent one (unique violation in pg_type); one creates, the others wait, then see
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                Base.metadata.create_all(conn)
            self._add_new_columns()
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _add_new_columns(self) -> None:
        """Add to existing tables the (nullable) columns added to the schema since they were created:
        create_all creates missing tables only. Idempotent; IF NOT EXISTS lets PostgreSQL workers
        starting together race safely (on SQLite the write transaction serialises them)."""
        guard = " IF NOT EXISTS" if self.is_postgres else ""
        with self.write() as conn:
            if self.is_postgres:  # CREATE INDEX (checkfirst) is not race-safe either: under the schema lock
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            for table in Base.metadata.sorted_tables:
                present = {column["name"] for column in inspect(conn).get_columns(table.name)}
                for column in table.columns:
                    if column.name not in present:
                        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN{guard} {column.name} "
                                          f"{column.type.compile(conn.dialect)}"))
                for index in table.indexes:  # the indexes of those columns (create_all made the others)
                    index.create(conn, checkfirst=True)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLAlchemy Core): committed on leaving the block, rolled back on an
        exception. On SQLite this process's writers take turns (``_WriterTurns``), and the turn is
        handed on only after the COMMIT or ROLLBACK."""
        with self._turn(), self._writer.begin() as conn:
            yield conn

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()


def _host_identity() -> str:
    """This host as lease owners name it: the host name plus a short digest of the kernel's boot id and
    this process's PID namespace. Two containers with the same host name (``--network host``) or a
    rebooted host are then different "hosts": a pid is only ever checked where it means the same
    process (``owner_is_dead_here``)."""
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(source).read_text().strip() if source.endswith("boot_id") else os.readlink(source))
        except OSError:
            parts.append("")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:8] if any(parts) else "0"
    return f"{socket.gethostname()}~{digest}"


#: This process's host identity (computed once: it does not change while the process lives).
HOST = _host_identity()


def new_owner() -> str:
    """Lease owner id ``host~id:pid:token`` (``_host_identity``; a random token, so a restarted pid is a
    different owner). Workers on other hosts can only wait for an owner's lease to expire."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True when ``owner`` was a process on this host (same boot, same PID namespace) that no longer
    exists: its claims can be taken back at once. Owners on other hosts, of the old ``host:pid:token``
    form, or of a pid that exists (possibly reused) are not: their claims wait for the lease."""
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
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
