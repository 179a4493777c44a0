"""Outbox rows on a real SQLite database: every state change of store/outbox.py, each only while the
claimer holds the lease."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from worker.store import outbox
from worker.store.db import HOST, TEXT_LIMIT, Database, OutboxItem, OutboxState, Result, Study, StudyState

ME, OTHER = "host:1:me", "host:2:other"
DESTINATIONS = [SimpleNamespace(name=n, host="127.0.0.1", port=104, ae_title=n.upper()) for n in ("a", "b")]


@pytest.fixture()
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    now = time.time()
    with db.session() as s, s.begin():
        s.add(Study(study_uid="1.1", status=StudyState.DONE, n_instances=1, first_received=now, last_received=now,
                    updated=now))
        s.flush()
        s.add(Result(id=1, study_uid="1.1", status=StudyState.DONE, threshold=0.5, model_name="m", model_version="1",
                     model_uid="3.1", n_instances=1, n_scored=1, created=now))
    yield db
    db.dispose()


def rows(db) -> dict[str, OutboxItem]:
    with db.session() as s:
        return {r.destination: r for r in s.query(OutboxItem).all()}


def test_enqueue_one_pending_row_per_destination(database):
    now = time.time()
    with database.write() as conn:
        outbox.enqueue(conn, 1, "1.1", "2.1", "/sr/2.1.dcm", DESTINATIONS, now)
        outbox.enqueue(conn, 1, "1.1", "2.2", "/sr/2.2.dcm", [], now)   # no destinations: no rows
    found = rows(database)
    assert sorted(found) == ["a", "b"]
    assert all((r.status, r.attempts, r.next_attempt, r.ae_title) == ("pending", 0, now, r.destination.upper())
               for r in found.values())


def test_claim_send_retry_and_sent(database):
    with database.write() as conn:
        outbox.enqueue(conn, 1, "1.1", "2.1", "/sr/2.1.dcm", DESTINATIONS, time.time() - 1)
    items = outbox.claim_due(database, ME, 60)
    assert [i.status for i in items] == ["sending", "sending"] and outbox.claim_due(database, OTHER, 60) == []
    a, b = sorted(items, key=lambda i: i.destination)
    outbox.mark_sent(database, a.id, OTHER, 0)         # not the claimer: refused
    assert rows(database)["a"].status == OutboxState.SENDING
    outbox.mark_sent(database, a.id, ME, 0)
    now = time.time()
    outbox.settle(database, ME, [outbox.Attempt(b.id, 0xA700, retry_at=now + 30, error="x" * (TEXT_LIMIT + 5))], now)
    found = rows(database)
    assert (found["a"].status, found["a"].attempts, found["a"].last_status, found["a"].lease_owner) == \
        ("sent", 1, 0, None)
    assert (found["b"].status, found["b"].attempts, found["b"].last_status, found["b"].next_attempt) == \
        ("pending", 1, 0xA700, now + 30)
    assert len(found["b"].last_error) == TEXT_LIMIT and found["b"].lease_owner is None
    assert outbox.claim_due(database, ME, 60) == []   # not due before its backoff is over
    with database.write() as conn:
        conn.execute(OutboxItem.__table__.update().values(next_attempt=0))
    [again] = outbox.claim_due(database, ME, 60)
    outbox.settle(database, ME, [outbox.Attempt(again.id, 0)], now)   # accepted, its commit had failed
    assert (rows(database)["b"].status, rows(database)["b"].attempts, rows(database)["b"].sent) == ("sent", 2, now)


def test_reclaim_returns_rows_of_dead_or_expired_claimers(database):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with database.write() as conn:
        outbox.enqueue(conn, 1, "1.1", "2.1", "/sr/2.1.dcm",
                       [SimpleNamespace(name=n, host="h", port=1, ae_title="X") for n in ("dead", "expired", "alive")],
                       time.time())
    owners = {"dead": (f"{HOST}:{dead.pid}:abc", time.time() + 3600),
              "expired": ("otherhost:1:abc", time.time() - 1), "alive": ("otherhost:1:abc", time.time() + 3600)}
    table = OutboxItem.__table__
    with database.write() as conn:
        for name, (owner, expires) in owners.items():
            conn.execute(table.update().where(table.c.destination == name)
                         .values(status=OutboxState.SENDING, lease_owner=owner, lease_expires=expires))
        assert outbox.reclaim(conn, time.time()) == 2
    assert {n: r.status for n, r in rows(database).items()} == {"dead": "pending", "expired": "pending",
                                                                 "alive": "sending"}


def test_an_sr_waits_until_its_heatmap_objects_are_delivered_to_that_destination(database):
    evidence = [outbox.Evidence("2.1.1", "/hm/2.1.1.dcm", "segmentation"),
                outbox.Evidence("2.1.2", "/hm/2.1.2.dcm", "key_image")]
    with database.write() as conn:
        outbox.enqueue(conn, 1, "1.1", "2.1", "/sr/2.1.dcm", DESTINATIONS, time.time() - 1, evidence)
    first = outbox.claim_due(database, ME, 60)
    # the objects for both destinations, never the SR: it references them
    assert sorted((i.destination, i.sr_sop_instance_uid, i.kind, i.evidence_for) for i in first) == [
        ("a", "2.1.1", "segmentation", "2.1"), ("a", "2.1.2", "key_image", "2.1"),
        ("b", "2.1.1", "segmentation", "2.1"), ("b", "2.1.2", "key_image", "2.1")]
    assert outbox.claim_due(database, OTHER, 60) == []
    by = {(i.destination, i.sr_sop_instance_uid): i for i in first}
    outbox.mark_sent(database, by["a", "2.1.1"].id, ME, 0)
    assert outbox.claim_due(database, ME, 60) == []            # a's key image is still out
    outbox.mark_sent(database, by["a", "2.1.2"].id, ME, 0)
    now = time.time()
    outbox.settle(database, ME, [outbox.Attempt(by["b", "2.1.2"].id, 0xA700, retry_at=now - 0.01, error="full")], now)
    outbox.mark_sent(database, by["b", "2.1.1"].id, ME, 0)
    second = outbox.claim_due(database, ME, 60)
    # a's SR (its objects delivered) and b's key image again; b's SR still waits for it
    assert sorted((i.destination, i.sr_sop_instance_uid, i.kind) for i in second) == [
        ("a", "2.1", None), ("b", "2.1.2", "key_image")]
    outbox.mark_sent(database, next(i for i in second if i.destination == "b").id, ME, 0)
    third = outbox.claim_due(database, ME, 60)
    assert [(i.destination, i.sr_sop_instance_uid) for i in third] == [("b", "2.1")]
