"""Storage Commitment of delivered SRs against a real Orthanc (its Storage Commitment SCP).

Orthanc answers the N-ACTION, then sends the N-EVENT-REPORT on a new association to the modality it
knows by the requester's AE title: the worker's own listener takes it. Pointing that modality at a
port where nothing listens makes the report never arrive (the wait times out), which the tests use
to hold a request "in flight" deterministically.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from testkit.orthanc import OrthancServer
from testkit.worker_process import WorkerProcess, free_port, storescu, wrap_jpeg

pytestmark = pytest.mark.orthanc

ROW = ("SELECT status, commitment_uid, commitment_requested, committed, sent, attempts, last_error "
       "FROM outbox WHERE study_uid = ?")


def _destination(pacs: OrthancServer, timeout: float = 3.0) -> dict:
    return {"name": "orthanc", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet,
            "storage_commitment": True, "commitment_timeout": timeout}


def _send_study(worker: WorkerProcess, kaggle_jpegs, tmp_path, tag: str) -> str:
    study_uid = generate_uid()
    files = [wrap_jpeg(jpeg, tmp_path / f"{tag}{i}.dcm", study_uid=study_uid)
             for i, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][:2])]
    assert storescu(worker.port, *files).returncode == 0
    return study_uid


def _row(worker: WorkerProcess, study_uid: str) -> dict:
    rows = worker.db_rows(ROW, study_uid)
    assert len(rows) <= 1
    keys = ("status", "uid", "requested", "committed", "sent", "attempts", "error")
    return dict(zip(keys, rows[0])) if rows else {}


def _sr_ids(pacs: OrthancServer, study_uid: str) -> list[str]:
    return [i["ID"] for i in pacs.study_instances(study_uid) if pacs.instance_tags(i["ID"]).get("Modality") == "SR"]


def _report(port: int, transaction_uid: str, sop_instance: str) -> int | None:
    """An N-EVENT-REPORT (all committed) sent to the worker's listener the way Orthanc sends it."""
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import StorageCommitmentPushModel

    ae = AE("ORTHANC")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER",
                         ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
    assert assoc.is_established
    try:
        info = Dataset()
        info.TransactionUID = transaction_uid
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        ref.ReferencedSOPInstanceUID = sop_instance
        info.ReferencedSOPSequence = [ref]
        rsp, _ = assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()
        ae.shutdown()


def test_committed_only_after_orthancs_report_and_unknown_reports_ignored(kaggle_jpegs, tmp_path):
    worker_port = free_port()
    with OrthancServer(modalities={"worker": ["CXR_WORKER", "127.0.0.1", worker_port]}) as pacs:
        with WorkerProcess(tmp_path / "data", port=worker_port, destinations=[_destination(pacs)]) as worker:
            study_uid = _send_study(worker, kaggle_jpegs, tmp_path, "a")
            row = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["status"] == "committed" and r,
                                  timeout=90, what="SR committed")
            assert row["uid"] and row["sent"] <= row["requested"] <= row["committed"] and row["error"] is None
            assert len(_sr_ids(pacs, study_uid)) == 1
            assert "1 committed, 0 failed" in worker.log()
            status = worker.status()
            assert status["outbox"]["committed"] == 1 and status["outbox"]["sent"] == 0
            result = [r for r in worker.results() if r["study_uid"] == study_uid][0]
            assert result["delivered"] == 1 and result["committed"] == 1
            sr_uid = result["sr_sop_instance_uid"]
            # A report for an unknown transaction, and a second one for the finished one: answered
            # Success, nothing changes.
            assert _report(worker_port, generate_uid(), sr_uid) == 0x0000
            assert _report(worker_port, row["uid"], sr_uid) == 0x0000
            assert _row(worker, study_uid) == row
            assert "unknown or superseded transaction" in worker.log()
        assert worker.process.returncode == 0


def test_no_report_retried_orthanc_down_retried_failed_reference_resent_then_committed(kaggle_jpegs, tmp_path):
    worker_port, nowhere = free_port(), free_port()
    # Orthanc's reports go nowhere at first: every request times out (never committed).
    with OrthancServer(modalities={"worker": ["CXR_WORKER", "127.0.0.1", nowhere]}) as pacs:
        worker = WorkerProcess(tmp_path / "data", port=worker_port, destinations=[_destination(pacs, 2.0)])
        with worker:
            study_uid = _send_study(worker, kaggle_jpegs, tmp_path, "b")
            first = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["status"] == "committing" and r,
                                    timeout=90, what="commitment requested")
            again = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["uid"] not in (None, first["uid"])
                                    and r, timeout=30, what="commitment requested again after the timeout")
            assert "no storage commitment report" in (again["error"] or "")
            assert again["committed"] is None and again["attempts"] > first["attempts"]
        # The worker stops with a request in flight: after the restart it is requested again.
        in_flight = _row(worker, study_uid)
        assert in_flight["status"] in ("committing", "sent") and in_flight["committed"] is None
        with worker:
            worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["uid"] not in (None, in_flight["uid"])
                            and r["requested"] > in_flight["requested"], timeout=30, what="re-requested after restart")
            # Orthanc down during the wait: the requests fail and are retried; never committed.
            pacs.stop()
            down = worker.wait_for(lambda: (r := _row(worker, study_uid)) and "connect" in (r["error"] or "") and r,
                                   timeout=30, what="request failed while Orthanc is down")
            assert down["status"] in ("sent", "committing") and down["committed"] is None
            waiting = worker.status()
            assert waiting["outbox"]["committed"] == 0 and waiting["delivery_errors"]
            assert waiting["outbox"]["sent"] + waiting["outbox"]["committing"] == 1
            pacs.start()
            # The SR is lost in the PACS (deleted), and its reports reach the worker now: Orthanc
            # reports the reference failed, the SR is sent again, then committed.
            sr_ids = _sr_ids(pacs, study_uid)
            assert len(sr_ids) == 1
            pacs.delete_instance(sr_ids[0])
            assert _sr_ids(pacs, study_uid) == []
            pacs.set_modality("worker", "CXR_WORKER", "127.0.0.1", worker_port)
            done = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["status"] == "committed" and r,
                                   timeout=60, what="committed after the resend")
            assert "0 committed, 1 failed (sent again)" in worker.log()
            assert "1 committed, 0 failed" in worker.log()
            assert done["sent"] > down["requested"] and done["error"] is None
            assert len(_sr_ids(pacs, study_uid)) == 1  # sent again: in the PACS once
        assert worker.process.returncode == 0
