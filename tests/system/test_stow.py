"""STOW-RS destinations against a real Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.orthanc import OrthancServer
from testkit.worker_process import WorkerProcess, storescu, wrap_jpeg

pytestmark = pytest.mark.orthanc

USERS = {"alice": "s3cret-pw"}
ROW = "SELECT status, attempts, last_status, last_error, url, sent FROM outbox WHERE study_uid = ?"


def _destination(pacs: OrthancServer) -> dict:
    return {"name": "web", "kind": "dicomweb", "url": pacs.dicomweb_url, "auth": "basic", "username": "alice",
            "password_env": "CXR_TEST_STOW_PASSWORD"}


def _row(worker: WorkerProcess, study_uid: str) -> dict:
    rows = worker.db_rows(ROW, study_uid)
    assert len(rows) <= 1
    return dict(zip(("status", "attempts", "last_status", "error", "url", "sent"), rows[0])) if rows else {}


def _study(pacs: OrthancServer, kaggle_jpegs, tmp_path, tag: str) -> tuple[str, list]:
    """A two-image study, in Orthanc already (the SR joins it there) and in files for the worker."""
    study_uid = generate_uid()
    files = [wrap_jpeg(jpeg, tmp_path / f"{tag}{i}.dcm", study_uid=study_uid, AccessionNumber="STOW1")
             for i, jpeg in enumerate(kaggle_jpegs["NORMAL"][:2])]
    for f in files:
        pacs.upload(f)
    return study_uid, files


def _srs(pacs: OrthancServer, study_uid: str) -> list[str]:
    return [i["ID"] for i in pacs.study_instances(study_uid) if pacs.instance_tags(i["ID"]).get("Modality") == "SR"]


def test_stow_rs_with_basic_auth_orthanc_down_then_up_sr_in_study_once(kaggle_jpegs, tmp_path):
    with OrthancServer(plugins=["dicomweb"], users=USERS) as pacs:
        study_uid, files = _study(pacs, kaggle_jpegs, tmp_path, "a")
        images = pacs.study_instances(study_uid)
        assert images
        env = {"CXR_TEST_STOW_PASSWORD": USERS["alice"]}
        with WorkerProcess(tmp_path / "data", destinations=[_destination(pacs)], env=env) as worker:
            pacs.stop()  # the destination is down when the SR is ready
            assert storescu(worker.port, *files).returncode == 0
            failed = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["attempts"] >= 2 and r,
                                     timeout=90, what="STOW-RS tries while Orthanc is down")
            assert failed["status"] in ("pending", "sending") and "ConnectError" in (failed["error"] or "")
            assert failed["url"] == pacs.dicomweb_url and failed["sent"] is None
            pacs.start()
            done = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["status"] == "sent" and r,
                                   timeout=30, what="SR delivered by STOW-RS")
            assert done["last_status"] == 200 and done["error"] is None
            srs = _srs(pacs, study_uid)
            assert len(srs) == 1 and len(pacs.study_instances(study_uid)) == len(images) + 1  # the SR joined them
            sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(srs[0])))
            result = [r for r in worker.results() if r["study_uid"] == study_uid][0]
            assert sr.SOPInstanceUID == result["sr_sop_instance_uid"] and sr.AccessionNumber == "STOW1"
            assert result["delivered"] == 1 and result["committed"] == 0
            assert worker.status()["outbox"]["sent"] == 1
        assert worker.process.returncode == 0
        # The worker again, on the same data: nothing is sent twice.
        with WorkerProcess(tmp_path / "data", destinations=[_destination(pacs)], env=env) as worker:
            worker.wait_for(lambda: "listening" in worker.log(), timeout=30, what="worker up")
            assert _row(worker, study_uid)["attempts"] == done["attempts"]
        assert len(_srs(pacs, study_uid)) == 1


def test_stow_rs_refused_credentials_recorded_and_kept_until_fixed(kaggle_jpegs, tmp_path):
    with OrthancServer(plugins=["dicomweb"], users=USERS) as pacs:
        study_uid, files = _study(pacs, kaggle_jpegs, tmp_path, "b")
        wrong = {"CXR_TEST_STOW_PASSWORD": "not-the-password", "CXR_WORKER__OUTBOX__RETRY_MAX_SECONDS": "2.0"}
        with WorkerProcess(tmp_path / "data", destinations=[_destination(pacs)], env=wrong) as worker:
            assert storescu(worker.port, *files).returncode == 0
            refused = worker.wait_for(lambda: (r := _row(worker, study_uid)) and r["attempts"] >= 1 and r,
                                      timeout=90, what="STOW-RS refused")
            assert refused["status"] in ("pending", "sending") and refused["last_status"] == 401
            assert "HTTP 401" in refused["error"]
            assert "next try in 2.0 s" in worker.log()  # cannot succeed by retrying: the longest backoff
            assert _srs(pacs, study_uid) == []
        fixed = {"CXR_TEST_STOW_PASSWORD": USERS["alice"]}
        with WorkerProcess(tmp_path / "data", destinations=[_destination(pacs)], env=fixed) as worker:
            worker.wait_for(lambda: _row(worker, study_uid)["status"] == "sent", timeout=60, what="delivered")
            assert len(_srs(pacs, study_uid)) == 1
