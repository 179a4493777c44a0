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
