"""The database on a real SQLite file: states as stored, the text limit, and Database.write (BEGIN
IMMEDIATE, this process's writers taking turns, reads never waiting for a writer)."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from worker.store.db import TEXT_LIMIT, Database, OutboxState, Study, StudyState, clip

STUDIES = Study.__table__


@pytest.fixture()
def path(tmp_path):
    return tmp_path / "w.db"


@pytest.fixture()
def database(path):
    db = Database(f"sqlite:///{path}", busy_timeout_ms=5000)
    yield db
    db.dispose()


def new_study(uid: str) -> dict:
    now = time.time()
    return dict(study_uid=uid, status=StudyState.RECEIVING, n_instances=1, first_received=now, last_received=now,
                updated=now, attempts=0, revision=0, scored_instances=0)


def count(db) -> int:
    with db.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(STUDIES))


def test_states_are_stored_as_the_same_strings(database, path):
    assert [s.value for s in StudyState] == ["receiving", "ready", "scoring", "done", "no_eligible_images", "failed"]
    assert [s.value for s in OutboxState] == ["pending", "sending", "sent", "committing", "committed"]
    with database.write() as conn:
        conn.execute(insert(STUDIES), new_study("1.1"))
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT status, typeof(status) FROM studies").fetchall() == [("receiving", "text")]


def test_clip_keeps_the_column_limit():
    assert clip("x" * (TEXT_LIMIT + 1)) == "x" * TEXT_LIMIT and clip("short") == "short"


def test_a_write_begins_immediate(database, path):
    """The write lock is taken at BEGIN, before any statement: another connection cannot write."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with database.write():
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")   # free once the write transaction ended
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_two_threads_writing_concurrently_both_succeed_without_interleaving(database):
    events: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(name: str) -> None:
        try:
            start.wait()
            for i in range(20):
                with database.write() as conn:
                    events.append((name, "in"))
                    conn.execute(insert(STUDIES), new_study(f"{name}.{i}"))
                    time.sleep(0.002)
                    events.append((name, "out"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and count(database) == 40
    pairs = [events[i:i + 2] for i in range(0, len(events), 2)]
    assert all(p == [(p[0][0], "in"), (p[0][0], "out")] for p in pairs)  # one transaction at a time
    assert {first for (first, _), _ in pairs} == {"a", "b"}


def test_a_waiting_writer_gets_its_turn_at_once(database):
    """The reason for the turns: behind a writer holding the lock for 240 ms, SQLite's busy handler
    would retry only at 228 and 328 ms (~90 ms late); the Python lock hands over on COMMIT."""
    handovers = []
    for _ in range(3):
        held, released, entered = threading.Event(), [0.0], [0.0]

        def first() -> None:
            with database.write() as conn:
                conn.execute(insert(STUDIES), new_study(f"h.{len(handovers)}"))
                held.set()
                time.sleep(0.24)
            released[0] = time.perf_counter()

        thread = threading.Thread(target=first)
        thread.start()
        held.wait()
        with database.write():
            entered[0] = time.perf_counter()
        thread.join()
        handovers.append(entered[0] - released[0])
    assert statistics.median(handovers) < 0.04, handovers


def test_a_failed_write_rolls_back_and_hands_the_turn_on(database):
    with pytest.raises(RuntimeError):
        with database.write() as conn:
            conn.execute(insert(STUDIES), new_study("r.1"))
            raise RuntimeError("boom")
    t0 = time.perf_counter()
    with database.write() as conn:      # a kept turn would wait the busy timeout (5 s) here
        conn.execute(insert(STUDIES), new_study("r.2"))
    assert time.perf_counter() - t0 < 1.0
    with database.engine.connect() as conn:
        assert conn.scalars(select(STUDIES.c.study_uid)).all() == ["r.2"]


def test_reads_do_not_wait_for_a_writer(database):
    inside, leave = threading.Event(), threading.Event()

    def writer() -> None:
        with database.write() as conn:
            conn.execute(insert(STUDIES), new_study("u.1"))
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        inside.wait(10)
        t0 = time.perf_counter()
        assert count(database) == 0                       # a snapshot: the uncommitted row is not seen
        with database.session() as s:
            assert s.scalar(select(func.count()).select_from(STUDIES)) == 0
        assert time.perf_counter() - t0 < 1.0             # not the busy timeout (5 s)
    finally:
        leave.set()
        thread.join()
    assert count(database) == 1


def test_waiting_is_bounded_by_the_busy_timeout(path):
    """Past the busy timeout a writer stops waiting for its turn and SQLite decides (here: locked)."""
    db = Database(f"sqlite:///{path}", busy_timeout_ms=300)
    inside, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with db.write():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        inside.wait(10)
        t0 = time.perf_counter()
        with pytest.raises(OperationalError, match="locked"):
            with db.write() as conn:
                conn.execute(insert(STUDIES), new_study("b.1"))
        assert 0.5 < time.perf_counter() - t0 < 3.0      # the turn (0.3 s), then SQLite's busy timeout (0.3 s)
    finally:
        leave.set()
        thread.join()
        db.dispose()
