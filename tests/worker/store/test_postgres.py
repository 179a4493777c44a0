"""Several workers on one real PostgreSQL never take the same study (FOR UPDATE SKIP LOCKED claims).

The test starts a throwaway PostgreSQL cluster (Debian's postgresql package) on a free port as the
``postgres`` user; CI installs it. Each claimer has its own engine and connections, as separate
worker processes would.
"""

from __future__ import annotations

import threading
import time

from worker.store.db import Database, Study, StudyState
from worker.store.studies import (ClaimedStudy, claim_ready, conclude, promote_quiet, reclaim_stale, record_arrival,
                                  release)

STUDIES = 60
CLAIMERS = 4


def test_workers_on_one_postgres_never_take_the_same_study(postgres_url):
    setup = Database(postgres_url)
    assert setup.is_postgres
    now = time.time()
    with setup.session() as s, s.begin():
        for i in range(STUDIES):
            s.add(Study(study_uid=f"9.9.{i}", status=StudyState.READY, n_instances=1, first_received=now,
                        last_received=now - STUDIES + i, updated=now, attempts=0, revision=0, scored_instances=0))
    taken: dict[str, list[str]] = {f"worker{k}": [] for k in range(CLAIMERS)}
    start = threading.Barrier(CLAIMERS)

    def claimer(name: str) -> None:
        db = Database(postgres_url, create=False)   # its own engine: like another worker process
        try:
            start.wait()
            while True:
                got = claim_ready(db, name, 2, 60)
                if not got:
                    return
                taken[name].extend(c.study_uid for c in got)
        finally:
            db.dispose()

    threads = [threading.Thread(target=claimer, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = [uid for uids in taken.values() for uid in uids]
    assert sorted(everything) == sorted(f"9.9.{i}" for i in range(STUDIES))   # each exactly once
    assert sum(1 for uids in taken.values() if uids) >= 2, taken               # really concurrent
    with setup.session() as s:
        owners = dict(s.query(Study.study_uid, Study.lease_owner).all())
        assert {s.query(Study.status).distinct().scalar()} == {StudyState.SCORING}
    for name, uids in taken.items():
        assert all(owners[uid] == name for uid in uids)
    setup.dispose()


def test_writers_do_not_take_turns_on_postgres(postgres_url):
    """PostgreSQL locks rows, not the database: two write transactions are open at once (on SQLite
    the second would wait for the first's turn and the barrier would time out)."""
    db = Database(postgres_url)
    both_inside = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def writer(uid: str) -> None:
        try:
            with db.write() as conn:
                record_arrival(conn, uid, None, time.time(), True)
                both_inside.wait()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"8.8.{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert not errors
        with db.session() as s:
            assert s.query(Study).filter(Study.study_uid.like("8.8.%")).count() == 2
    finally:
        db.dispose()


def test_a_study_travels_the_lifecycle_on_postgres(postgres_url):
    """Each transition's SQL on PostgreSQL (row locks, CASE): arrival, quiet, claim, conclude with a
    late arrival, claim again, release, reclaim of an expired lease, conclude."""
    db = Database(postgres_url)
    owner, uid = "host:1:pg", "7.7.1"
    try:
        with db.write() as conn:
            assert record_arrival(conn, uid, "ACC", time.time() - 60, True) is None
        assert promote_quiet(db, 5.0) >= 1
        [study] = [c for c in claim_ready(db, owner, 100, 60) if c.study_uid == uid]
        with db.write() as conn:
            assert record_arrival(conn, uid, "ACC", time.time(), True) is None   # arrives while scoring
        with db.write() as conn:
            assert conclude(conn, owner, study, StudyState.DONE, 1, None, time.time()) == StudyState.RECEIVING
        assert promote_quiet(db, 0.0) >= 1
        [study] = [c for c in claim_ready(db, owner, 100, 60) if c.study_uid == uid]
        release(db, owner, [study.id], "boom")
        with db.session() as s:
            assert (s.query(Study.status, Study.error).filter_by(study_uid=uid).one()) == ("ready", "boom")
        [study] = [c for c in claim_ready(db, owner, 100, -1) if c.study_uid == uid]   # its lease expired
        assert reclaim_stale(db) >= 1
        [study] = [c for c in claim_ready(db, owner, 100, 60) if c.study_uid == uid]
        assert isinstance(study, ClaimedStudy) and study.n_instances == 2
        with db.write() as conn:
            assert conclude(conn, owner, study, StudyState.DONE, 2, None, time.time()) == StudyState.DONE
        with db.session() as s:
            row = s.query(Study).filter_by(study_uid=uid).one()
        assert (row.status, row.revision, row.attempts, row.lease_owner) == ("done", 2, 4, None)
    finally:
        db.dispose()


def test_the_first_instances_of_one_study_at_two_workers_make_one_study_row(postgres_url):
    """Two workers (two engines) record the first instance of the same new study at the same moment:
    the second INSERT waits for the first transaction, then finds the row (ON CONFLICT DO NOTHING and
    a locked re-read) instead of failing the receiver's transaction with a unique violation; the
    study counts both instances."""
    first, second = Database(postgres_url), Database(postgres_url, create=False)
    uid, errors = "6.6.1", []
    inserted = threading.Event()

    def late_writer() -> None:
        inserted.wait(10)
        try:
            with second.write() as conn:
                assert record_arrival(conn, uid, None, time.time(), True) is None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=late_writer)
    thread.start()
    try:
        with first.write() as conn:
            assert record_arrival(conn, uid, None, time.time(), True) is None
            inserted.set()
            time.sleep(0.5)      # the other worker's INSERT is now waiting on this uncommitted row
        thread.join(timeout=30)
        assert not errors, errors
        with first.session() as s:
            assert s.query(Study.n_instances, Study.status).filter_by(study_uid=uid).one() == (2, "receiving")
    finally:
        first.dispose()
        second.dispose()


def test_promotion_and_reclaim_skip_rows_another_transaction_holds(postgres_url):
    """A row locked by another worker's transaction (an arrival, the owner committing its result) is
    neither waited for nor changed by promotion and reclaim; once released it is."""
    db, other = Database(postgres_url), Database(postgres_url, create=False)
    now = time.time()
    try:
        with db.write() as conn:
            record_arrival(conn, "5.5.1", None, now - 60, True)
        with db.session() as s, s.begin():
            s.add(Study(study_uid="5.5.2", status=StudyState.SCORING, n_instances=1, first_received=now,
                        last_received=now, updated=now, attempts=1, revision=0, scored_instances=1,
                        lease_owner="elsewhere~x:1:abc", lease_expires=now - 1))
        with other.write() as held:
            held.execute(Study.__table__.select().where(Study.study_uid.in_(["5.5.1", "5.5.2"])).with_for_update())
            started = time.monotonic()
            assert promote_quiet(db, 30.0) == 0 and reclaim_stale(db) == 0
            assert time.monotonic() - started < 5      # not blocked by the held locks
        assert promote_quiet(db, 30.0) == 1 and reclaim_stale(db) == 1
    finally:
        db.dispose()
        other.dispose()


def test_an_sr_waits_for_its_heatmap_objects_on_postgres_while_two_workers_claim(postgres_url):
    """The outbox claim's NOT EXISTS (objects before their SR) together with FOR UPDATE SKIP LOCKED:
    two claimers take disjoint rows, and no SR is claimed before its objects are delivered."""
    from types import SimpleNamespace

    from worker.store import outbox
    from worker.store.db import OutboxItem, OutboxState, Result

    import uuid

    db = Database(postgres_url)
    now = time.time()
    study_uid = f"2.25.{uuid.uuid4().int % 10**30}"  # its own study: the module's other tests share the database
    try:
        with db.session() as s, s.begin():
            s.add(Study(study_uid=study_uid, status=StudyState.DONE, n_instances=1, first_received=now,
                        last_received=now, updated=now))
            s.flush()
            s.add(Result(study_uid=study_uid, status=StudyState.DONE, threshold=0.5, model_name="m",
                         model_version="1", model_uid="3.3", n_instances=1, n_scored=1, created=now))
        with db.session() as s:
            result_id = s.query(Result.id).filter(Result.study_uid == study_uid).scalar()
        dest = [SimpleNamespace(name="pg-dest", host="127.0.0.1", port=104, ae_title="PACS")]
        with db.write() as conn:
            for n in range(5):
                outbox.enqueue(conn, result_id, study_uid, f"{study_uid}.{n}", f"/sr/{n}.dcm", dest, now - 1,
                               [outbox.Evidence(f"{study_uid}.{n}.1", f"/o/{n}.1", "segmentation"),
                                outbox.Evidence(f"{study_uid}.{n}.2", f"/o/{n}.2", "key_image")])
        first = outbox.claim_due(db, "host:1:a", 60, limit=6) + outbox.claim_due(db, "host:2:b", 60, limit=6)
        assert len(first) == 10 and len({i.id for i in first}) == 10 and all(i.kind for i in first)
        for item in first:
            outbox.mark_sent(db, item.id, item.lease_owner, 0)
        second = outbox.claim_due(db, "host:1:a", 60)
        assert sorted(i.sr_sop_instance_uid for i in second) == [f"{study_uid}.{n}" for n in range(5)]
        assert all(i.kind is None and i.status == OutboxState.SENDING for i in second)
    finally:
        with db.write() as conn:
            conn.execute(OutboxItem.__table__.delete().where(OutboxItem.study_uid == study_uid))
            conn.execute(Result.__table__.delete().where(Result.study_uid == study_uid))
            conn.execute(Study.__table__.delete().where(Study.study_uid == study_uid))
        db.dispose()
