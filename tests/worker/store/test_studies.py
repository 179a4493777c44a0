"""The study queue on a real SQLite database: quiet period, exclusive claims, reclaiming dead claims."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from worker.store import db as dbm
from worker.store.db import Database, Study
from worker.settings import OutboxSettings, SettingsError, load_settings
from worker.store.studies import claim_ready, promote_quiet


@pytest.fixture()
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    yield db
    db.dispose()


def add_study(db, uid, status=dbm.STUDY_RECEIVING, last=None, owner=None, expires=None):
    now = time.time()
    with db.session() as s, s.begin():
        s.add(Study(study_uid=uid, status=status, n_instances=1, first_received=now,
                    last_received=now if last is None else last, updated=now, lease_owner=owner,
                    lease_expires=expires, attempts=0, revision=0, scored_instances=0))


def status_of(db, uid):
    with db.session() as s:
        return s.query(Study.status).filter_by(study_uid=uid).scalar()


def test_quiet_period_then_ready(database):
    add_study(database, "1.1", last=time.time() - 10)
    add_study(database, "1.2", last=time.time())
    assert promote_quiet(database, 5.0) == 1
    assert status_of(database, "1.1") == dbm.STUDY_READY and status_of(database, "1.2") == dbm.STUDY_RECEIVING


def test_concurrent_claims_are_exclusive(database):
    for i in range(40):
        add_study(database, f"2.{i}", status=dbm.STUDY_READY)
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
    host = socket.gethostname()
    future = time.time() + 3600
    add_study(database, "3.1", dbm.STUDY_SCORING, owner=f"{host}:{dead.pid}:abc", expires=future)   # dead here
    add_study(database, "3.2", dbm.STUDY_SCORING, owner="otherhost:1:abc", expires=time.time() - 1)  # expired
    add_study(database, "3.3", dbm.STUDY_SCORING, owner="otherhost:1:abc", expires=future)           # alive
    assert dbm.reclaim_stale(database) == 2
    assert [status_of(database, u) for u in ("3.1", "3.2", "3.3")] == ["ready", "ready", "scoring"]


def test_settings_validation_and_backoff(tmp_path):
    s = load_settings(environ={"CXR_WORKER__NETWORK__PORT": "11999",
                               "CXR_WORKER__DESTINATIONS": '[{name="p", host="h", port=104, ae_title="PACS"}]'})
    assert s.network.port == 11999 and s.destinations[0].ae_title == "PACS"
    with pytest.raises(SettingsError, match="ae_title"):
        load_settings(environ={"CXR_WORKER__NETWORK__AE_TITLE": "THIS_AE_TITLE_IS_TOO_LONG"})
    with pytest.raises(SettingsError, match="unknown configuration key"):
        load_settings(environ={"CXR_WORKER__NETWORK__PROT": "1"})
    backoff = OutboxSettings(retry_base_seconds=2, retry_max_seconds=30)
    assert [backoff.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]


def test_sr_uids_are_deterministic_valid_and_distinct():
    from pydicom.uid import UID

    from worker.scorer_loop import sr_uids

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
    from worker.net.listener import Receiver
    from worker.store.spool import Spool

    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path}"',
                                      "CXR_WORKER__STUDIES__RESCORE_LATE_ARRIVALS": str(rescore).lower()})
    db = Database(settings.storage.url)
    receiver = Receiver(settings, db, Spool(settings.storage.data_dir))

    def record(sop: str) -> None:
        header = Header("2.25.7", "2.25.8", sop, "1.2.840.10008.5.1.4.1.1.1.1", "DX", "CHEST", "PA", "A7",
                        "1.2.840.10008.1.2.1")
        assert receiver._record(header, tmp_path / f"{sop}.dcm", 10, "MODALITY") == 0x0000

    try:
        record("2.25.71")
        with db.session() as s, s.begin():
            s.query(Study).filter_by(study_uid="2.25.7").update({"status": dbm.STUDY_READY})
        record("2.25.72")
        assert status_of(db, "2.25.7") == dbm.STUDY_RECEIVING  # quiet period restarted
        with db.session() as s, s.begin():
            s.query(Study).filter_by(study_uid="2.25.7").update({"status": dbm.STUDY_DONE})
        record("2.25.73")
        with db.session() as s:
            study = s.query(Study).filter_by(study_uid="2.25.7").one()
            late = s.query(Instance).filter_by(sop_instance_uid="2.25.73").one()
        assert study.n_instances == 3
        if rescore:
            assert study.status == dbm.STUDY_RECEIVING and late.eligible and late.reason is None
        else:
            assert study.status == dbm.STUDY_DONE and not late.eligible and late.reason == "late_arrival"
    finally:
        db.dispose()
