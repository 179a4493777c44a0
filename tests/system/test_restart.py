"""Nothing lost across restarts: received-but-unscored studies, and SRs waiting for a destination."""

from __future__ import annotations

import signal

from pydicom.uid import generate_uid

from testkit.worker_process import StoreSCP, WorkerProcess, db_rows, free_port, storescu, wrap_jpeg



def test_killed_before_scoring_then_destination_down_then_up(kaggle_jpegs, tmp_path):
    data = tmp_path / "data"
    dest_port = free_port()               # nothing listens here yet: the destination is down
    dest = StoreSCP(tmp_path / "dest", port=dest_port)
    destinations = [dest.destination()]
    study_uid = generate_uid()
    files = [wrap_jpeg(j, tmp_path / f"{i}.dcm", study_uid=study_uid) for i, j in enumerate(kaggle_jpegs["NORMAL"][:2])]

    # 1. Received and acknowledged, then the worker is killed (SIGKILL) before the quiet period ends.
    first = WorkerProcess(data, quiet=3600, destinations=destinations).start()
    try:
        assert storescu(first.port, *files).returncode == 0
        # Success was answered, so both instances must already be durable and committed.
        assert db_rows(data, "select count(*) from instances where study_uid=?", study_uid) == [(2,)]
        assert db_rows(data, "select status from studies where study_uid=?", study_uid) == [("receiving",)]
    finally:
        first.stop(signal.SIGKILL)

    # 2. Restart: the study is scored once; the SR waits in the outbox while the destination is down.
    second = WorkerProcess(data, port=first.port, quiet=0.5, destinations=destinations).start()
    second.wait_for(lambda: [r for r in second.results() if r["study_uid"] == study_uid], what="result")
    second.wait_for(lambda: db_rows(data, "select attempts from outbox where study_uid=? and attempts >= 2",
                                   study_uid), what="failed delivery attempts")
    outbox = db_rows(data, "select status, last_error from outbox where study_uid=?", study_uid)
    assert len(outbox) == 1 and outbox[0][0] in ("pending", "sending") and outbox[0][1]
    assert second.status()["outbox"]["sent"] == 0
    assert second.stop() == 0             # SIGTERM: clean stop, exit 0, SR still waiting

    # 3. Restart again, then the destination comes up: the SR is delivered exactly once.
    third = WorkerProcess(data, port=first.port, quiet=0.5, destinations=destinations).start()
    try:
        with dest:
            third.wait_for(lambda: db_rows(data, "select 1 from outbox where study_uid=? and status='sent'", study_uid),
                           timeout=30, what="delivery after the destination came up")
            received = [ds for ds in dest.files() if ds.StudyInstanceUID == study_uid]
            assert len(received) == 1 and received[0].Modality == "SR"
    finally:
        assert third.stop() == 0
    assert db_rows(data, "select count(*) from results where study_uid=?", study_uid) == [(1,)]
    assert db_rows(data, "select revision, status from studies where study_uid=?", study_uid) == [(1, "done")]
    assert db_rows(data, "select count(*) from outbox") == [(1,)]
    assert len(list((data / "sr").rglob("*.dcm"))) == 1
