"""A database made before a column was added to the schema gets the column when the worker starts."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, inspect, insert, select, text

from worker.store.db import Database, Instance, Study, StudyState


def _old_database(url: str) -> None:
    """The schema as it was before instances.sr_attributes, with one study and one instance row."""
    db = Database(url)
    now = time.time()
    with db.write() as conn:
        conn.execute(insert(Study).values(study_uid="2.25.1", status=StudyState.RECEIVING, n_instances=1,
                                          first_received=now, last_received=now, updated=now))
        conn.execute(insert(Instance).values(sop_instance_uid="2.25.2", study_uid="2.25.1", sop_class_uid="1.2",
                                             path="/x.dcm", size=1, received=now, eligible=True))
        conn.execute(text("ALTER TABLE instances DROP COLUMN sr_attributes"))
    db.dispose()


def _columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {column["name"] for column in inspect(engine).get_columns("instances")}
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("postgres_url")


def test_an_old_database_gets_the_new_column(url):
    _old_database(url)
    assert "sr_attributes" not in _columns(url)
    for expected in (None, b"E\x00"):  # the old row reads NULL; a second start keeps what was written
        db = Database(url)
        try:
            with db.session() as s:
                row = s.scalars(select(Instance)).one()  # the ORM selects every column, sr_attributes too
            assert row.sop_instance_uid == "2.25.2" and row.sr_attributes == expected
            with db.write() as conn:
                conn.execute(Instance.__table__.update().values(sr_attributes=b"E\x00"))
        finally:
            db.dispose()
    assert "sr_attributes" in _columns(url)


OUTBOX_NEW = ("url", "commitment", "commitment_uid", "commitment_requested", "committed")


def test_an_old_outbox_gets_the_delivery_columns_and_its_rows_are_sent_as_before(url):
    """An outbox from before STOW-RS and storage commitment: the columns are added, an old pending row
    is claimed and delivered as a DIMSE row, an old sent row is never asked for commitment."""
    from worker.store.db import OutboxItem, OutboxState, Result
    from worker.store.outbox import claim_commitments, claim_due

    db = Database(url)
    now = time.time()
    with db.write() as conn:
        conn.execute(insert(Study).values(study_uid="2.25.7", status=StudyState.DONE, n_instances=1,
                                          first_received=now, last_received=now, updated=now))
        result_id = conn.execute(insert(Result).values(
            study_uid="2.25.7", status=StudyState.DONE, threshold=0.5, model_name="m", model_version="1",
            model_uid="2.25.8", n_instances=1, n_scored=1, created=now)).inserted_primary_key[0]
        for uid, state in (("2.25.9", OutboxState.PENDING), ("2.25.10", OutboxState.SENT)):
            conn.execute(insert(OutboxItem).values(result_id=result_id, study_uid="2.25.7", sr_sop_instance_uid=uid,
                                                   sr_path="/x.dcm", destination="pacs", host="h", port=104,
                                                   ae_title="PACS", status=state, attempts=0, next_attempt=now - 1,
                                                   created=now))
        for column in OUTBOX_NEW:
            conn.execute(text(f"ALTER TABLE outbox DROP COLUMN {column}"))
    db.dispose()
    engine = create_engine(url)
    try:
        assert not set(OUTBOX_NEW) & {c["name"] for c in inspect(engine).get_columns("outbox")}
    finally:
        engine.dispose()
    db = Database(url)
    try:
        assert claim_commitments(db, "me", 60) == []
        [item] = claim_due(db, "me", 60)
        assert item.sr_sop_instance_uid == "2.25.9" and item.url is None and not item.commitment
    finally:
        db.dispose()
