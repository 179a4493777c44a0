"""The study queue on a real SQLite database: every lifecycle transition of store/studies.py (and the
refused ones), quiet period, exclusive claims, reclaiming dead claims."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from worker.store.db import HOST, TEXT_LIMIT, Database, Study, StudyState
from worker.settings import load_settings
from worker.store.studies import (LATE_ARRIVAL, MAX_ATTEMPTS, TRANSITIONS, ClaimedStudy, Event, claim_ready, conclude,
                                  promote_quiet, reclaim_stale, record_arrival, release, renew)


@pytest.fixture()
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    yield db
    db.dispose()


def add_study(db, uid, status=StudyState.RECEIVING, last=None, owner=None, expires=None, attempts=0):
    now = time.time()
    with db.session() as s, s.begin():
        study = Study(study_uid=uid, status=status, n_instances=1, first_received=now,
                      last_received=now if last is None else last, updated=now, lease_owner=owner,
                      lease_expires=expires, attempts=attempts, revision=0, scored_instances=0)
        s.add(study)
        s.flush()
        return study.id


def status_of(db, uid):
    with db.session() as s:
        return s.query(Study.status).filter_by(study_uid=uid).scalar()


def test_quiet_period_then_ready(database):
    add_study(database, "1.1", last=time.time() - 10)
    add_study(database, "1.2", last=time.time())
    assert promote_quiet(database, 5.0) == 1
    assert status_of(database, "1.1") == StudyState.READY and status_of(database, "1.2") == StudyState.RECEIVING


def test_concurrent_claims_are_exclusive(database):
    for i in range(40):
        add_study(database, f"2.{i}", status=StudyState.READY)
    taken: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def claimer(name):
        while True:
            got = claim_ready(database, name, 3, 60)
            if not got:
                return
            taken[name].extend(c.study_uid for c in got)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [uid for uids in taken.values() for uid in uids]
    assert len(everything) == 40 and len(set(everything)) == 40  # each study claimed exactly once


def test_claims_of_dead_or_expired_workers_are_reclaimed(database):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    future = time.time() + 3600
    add_study(database, "3.1", StudyState.SCORING, owner=f"{HOST}:{dead.pid}:abc", expires=future)   # dead here
    add_study(database, "3.2", StudyState.SCORING, owner="otherhost:1:abc", expires=time.time() - 1)  # expired
    add_study(database, "3.3", StudyState.SCORING, owner="otherhost:1:abc", expires=future)           # alive
    # the same host name in another PID namespace or boot (a container with --network host, a reboot):
    # its pid means nothing here, so only its lease counts
    add_study(database, "3.4", StudyState.SCORING, owner=f"{socket.gethostname()}~other:{dead.pid}:abc",
              expires=future)
    assert reclaim_stale(database) == 2
    assert [status_of(database, u) for u in ("3.1", "3.2", "3.3", "3.4")] == ["ready", "ready", "scoring", "scoring"]


def test_sr_uids_are_deterministic_valid_and_distinct():
    from pydicom.uid import UID

    from worker.sr import sr_uids

    a = sr_uids("1.2.3", "2.25.9", 1)
    assert a == sr_uids("1.2.3", "2.25.9", 1)               # a retry gets the same SR UIDs
    b = sr_uids("1.2.3", "2.25.9", 2)
    assert b[0] == a[0] and b[1] != a[1]                     # next revision: same series, new instance
    assert sr_uids("1.2.4", "2.25.9", 1)[1] != a[1]
    for uid in (*a, *b):
        assert UID(uid).is_valid and len(uid) <= 64


@pytest.mark.parametrize("rescore", [True, False])
def test_an_instance_after_scoring_reopens_or_is_recorded_as_late(tmp_path, rescore):
    """The receiver's record step (real SQLite): a new instance of a scored study re-opens it for a
    new SR revision, or, with studies.rescore_late_arrivals = false, is kept but marked late_arrival.
    An instance arriving during the quiet period's 'ready' state restarts the quiet period."""
    from worker.store.db import Instance
    from worker.scoring.eligibility import Header
    from worker.receiver import Received, Receiver
    from worker.store.spool import Spool

    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path}"',
                                      "CXR_WORKER__STUDIES__RESCORE_LATE_ARRIVALS": str(rescore).lower()})
    db = Database(settings.storage.url)
    receiver = Receiver(settings, db, Spool(settings.storage.data_dir))

    def record(sop: str) -> None:
        header = Header("2.25.7", "2.25.8", sop, "1.2.840.10008.5.1.4.1.1.1.1", "DX", "CHEST", "PA", "A7",
                        "1.2.840.10008.1.2.1")
        assert receiver._record(header, tmp_path / f"{sop}.dcm", 10, "MODALITY") is Received.STORED

    try:
        record("2.25.71")
        with db.session() as s, s.begin():
            s.query(Study).filter_by(study_uid="2.25.7").update({"status": StudyState.READY})
        record("2.25.72")
        assert status_of(db, "2.25.7") == StudyState.RECEIVING  # quiet period restarted
        with db.session() as s, s.begin():
            s.query(Study).filter_by(study_uid="2.25.7").update({"status": StudyState.DONE})
        record("2.25.73")
        with db.session() as s:
            study = s.query(Study).filter_by(study_uid="2.25.7").one()
            late = s.query(Instance).filter_by(sop_instance_uid="2.25.73").one()
        assert study.n_instances == 3
        if rescore:
            assert study.status == StudyState.RECEIVING and late.eligible and late.reason is None
        else:
            assert study.status == StudyState.DONE and not late.eligible and late.reason == "late_arrival"
    finally:
        db.dispose()


# -- every transition, from every state ------------------------------------------------------------------
ME = "host:1:me"


def one_study_per_state(db, **kwargs) -> dict[StudyState, int]:
    """A study in each state, all quiet for a minute and leased to ME until an hour ago (expired)."""
    return {state: add_study(db, f"5.{i}", state, last=time.time() - 60, owner=ME, expires=time.time() - 3600,
                             **kwargs) for i, state in enumerate(StudyState)}


def states_of(db, ids: dict[StudyState, int]) -> dict[StudyState, str]:
    with db.session() as s:
        found = dict(s.query(Study.id, Study.status).all())
    return {before: found[sid] for before, sid in ids.items()}


def claimed(db, sid) -> ClaimedStudy:
    with db.session() as s:
        row = s.get(Study, sid)
        return ClaimedStudy(row.id, row.study_uid, row.accession, row.n_instances, row.revision, time.time())


def arrive(db, uid, rescore=True):
    with db.write() as conn:
        return record_arrival(conn, uid, "A1", time.time(), rescore)


def _conclude_all(db, ids, verdict=StudyState.DONE, owner=ME):
    with db.write() as conn:
        return {state: conclude(conn, owner, claimed(db, sid), verdict, 1, None, time.time())
                for state, sid in ids.items()}


EVENTS = {  # event -> (run it on every study, the states it leads to when legal)
    Event.ARRIVAL: (lambda db, ids: [arrive(db, f"5.{i}") for i in range(len(ids))],
                    {StudyState.RECEIVING: "receiving", StudyState.READY: "receiving", StudyState.SCORING: "scoring",
                     StudyState.DONE: "receiving", StudyState.NO_ELIGIBLE: "receiving",
                     StudyState.FAILED: "receiving"}),
    Event.QUIET: (lambda db, ids: promote_quiet(db, 5.0), {StudyState.RECEIVING: "ready"}),
    Event.CLAIM: (lambda db, ids: claim_ready(db, "host:2:other", 10, 60), {StudyState.READY: "scoring"}),
    Event.RENEW: (lambda db, ids: renew(db, ME, list(ids.values()), 60), {StudyState.SCORING: "scoring"}),
    Event.CONCLUDE: (lambda db, ids: _conclude_all(db, ids), {StudyState.SCORING: "done"}),
    Event.RELEASE: (lambda db, ids: release(db, ME, list(ids.values()), "boom"), {StudyState.SCORING: "ready"}),
    Event.RECLAIM: (lambda db, ids: reclaim_stale(db), {StudyState.SCORING: "ready"}),
}


@pytest.mark.parametrize("event", list(Event))
def test_each_transition_from_every_state(database, event):
    """Each named function moves exactly the states the table allows and leaves every other study as
    it is (an illegal transition is refused, not an error)."""
    run, legal = EVENTS[event]
    ids = one_study_per_state(database)
    run(database, ids)
    after = states_of(database, ids)
    assert after == {state: legal.get(state, state.value) for state in StudyState}
    for state, reached in after.items():
        allowed = TRANSITIONS.get((state, event))
        assert (reached in allowed) if allowed else reached == state, (state, event, reached)
    assert set(legal) == {state for state, e in TRANSITIONS if e == event}  # the table lists no other source


def test_arrival_creates_then_counts_and_late_arrivals_follow_the_setting(database):
    assert arrive(database, "6.1") is None
    with database.session() as s:
        study = s.query(Study).filter_by(study_uid="6.1").one()
    assert (study.status, study.n_instances, study.accession, study.revision) == ("receiving", 1, "A1", 0)
    assert arrive(database, "6.1") is None
    assert status_of(database, "6.1") == StudyState.RECEIVING
    for scored in (StudyState.DONE, StudyState.NO_ELIGIBLE, StudyState.FAILED):
        uid = f"6.{scored}"
        add_study(database, uid, scored)
        assert arrive(database, uid, rescore=False) == LATE_ARRIVAL
        assert status_of(database, uid) == scored                  # kept: the instance is the late one
        assert arrive(database, uid, rescore=True) is None
        assert status_of(database, uid) == StudyState.RECEIVING    # re-opened for a new SR revision
    with database.session() as s:
        assert s.query(Study.n_instances).filter_by(study_uid="6.done").scalar() == 3


def test_conclude_records_the_verdict_or_reopens_and_refuses_a_lost_lease(database):
    sid = add_study(database, "7.1", StudyState.SCORING, owner=ME, expires=time.time() + 60)
    study = claimed(database, sid)
    with database.write() as conn:   # another owner: refused, nothing changes
        assert conclude(conn, "host:2:other", study, StudyState.DONE, 1, None, time.time()) is None
    assert status_of(database, "7.1") == StudyState.SCORING
    with pytest.raises(ValueError, match="not a verdict"):
        with database.write() as conn:
            conclude(conn, ME, study, StudyState.READY, 1, None, time.time())
    arrive(database, "7.1")          # an instance arrives while it is scored
    with database.write() as conn:
        assert conclude(conn, ME, study, StudyState.NO_ELIGIBLE, 1, "no eligible image", time.time()) \
            == StudyState.RECEIVING
    with database.session() as s:
        row = s.get(Study, sid)
    assert (row.status, row.revision, row.error, row.lease_owner, row.lease_expires) == \
        ("receiving", 1, "no eligible image", None, None)
    sid = add_study(database, "7.2", StudyState.SCORING, owner=ME, expires=time.time() + 60)
    with database.write() as conn:
        assert conclude(conn, ME, claimed(database, sid), StudyState.FAILED, 4, "sr_failed", time.time()) \
            == StudyState.FAILED
    assert status_of(database, "7.2") == StudyState.FAILED


def test_release_fails_a_study_after_max_attempts_and_only_for_its_owner(database):
    again = add_study(database, "8.1", StudyState.SCORING, owner=ME, attempts=MAX_ATTEMPTS - 1)
    spent = add_study(database, "8.2", StudyState.SCORING, owner=ME, attempts=MAX_ATTEMPTS)
    other = add_study(database, "8.3", StudyState.SCORING, owner="host:2:other", attempts=MAX_ATTEMPTS)
    release(database, ME, [again, spent, other], "x" * (TEXT_LIMIT + 10))
    with database.session() as s:
        rows = {r.id: r for r in s.query(Study).all()}
    assert [rows[i].status for i in (again, spent, other)] == ["ready", "failed", "scoring"]
    assert len(rows[again].error) == TEXT_LIMIT and rows[other].error is None
    assert rows[again].lease_owner is None and rows[other].lease_owner == "host:2:other"


def test_renew_extends_only_the_owners_lease(database):
    mine = add_study(database, "9.1", StudyState.SCORING, owner=ME, expires=1.0)
    theirs = add_study(database, "9.2", StudyState.SCORING, owner="host:2:other", expires=1.0)
    renew(database, ME, [mine, theirs], 60)
    with database.session() as s:
        expires = dict(s.query(Study.id, Study.lease_expires).all())
    assert expires[mine] > time.time() + 50 and expires[theirs] == 1.0
