"""`cxr-worker serve` as a real process, driven by DCMTK (echoscu, storescu) with DCMTK storescp as the
SR destination. One worker for the module; each test uses its own studies."""

from __future__ import annotations

import datetime

import os
import time
import subprocess

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.dicom_factory import encode_with_tool
from testkit.worker_process import WorkerProcess, dcmtk, shared_runner, storescu, wrap_jpeg

pytestmark = pytest.mark.dcmtk

PHI_NAME = "Zyxwvut^Phiname"
PHI_ID = "PHIID-918273"
#: A child's birth date (3 years ago): inside the shipped model's intended use (1-5 years), so scored.
PHI_BIRTH = (datetime.date.today() - datetime.timedelta(days=3 * 365)).strftime("%Y%m%d")


@pytest.fixture(scope="module")
def worker(tmp_path_factory, destination):
    root = tmp_path_factory.mktemp("worker")
    with WorkerProcess(root / "data", destinations=[destination.destination()]) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def result_for(worker: WorkerProcess, study_uid: str, delivered: int | None = None):
    def ready():
        rows = [r for r in worker.results() if r["study_uid"] == study_uid]
        if rows and (delivered is None or rows[0]["delivered"] >= delivered):
            return rows
        return None
    return worker.wait_for(ready, what=f"result for {study_uid}")



def test_echoscu_and_called_aet_check(worker):
    ok = subprocess.run([dcmtk("echoscu"), "-aec", "CXR_WORKER", "127.0.0.1", str(worker.port)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run([dcmtk("echoscu"), "-aec", "NOT_US", "127.0.0.1", str(worker.port)],
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode != 0  # require_called_aet: association rejected


def test_study_via_storescu_scored_once_sr_delivered_duplicate_ignored(worker, destination, kaggle_jpegs, tmp_path):
    study_uid = generate_uid()
    files = [wrap_jpeg(jpeg, tmp_path / f"{i}.dcm", study_uid=study_uid, patient_name=PHI_NAME,
                       patient_id=PHI_ID, PatientBirthDate=PHI_BIRTH, AccessionNumber="ACC123")
             for i, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][:2])]
    sent = storescu(worker.port, *files)
    assert sent.returncode == 0, sent.stderr
    rows = result_for(worker, study_uid, delivered=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "done" and row["n_scored"] == 2 and row["accession"] == "ACC123"
    assert 0.0 <= row["probability"] <= 1.0 and row["label"] in ("NORMAL", "PNEUMONIA")
    assert row["model_uid"] and row["total_s"] > 0

    # Study probability = max over images, as classify scores each file.
    probs = [s.probability for s in shared_runner().score([(f, f) for f in files])]
    assert row["probability"] == pytest.approx(max(probs), abs=1e-5)

    # The SR file exists under sr/ and reached the destination, in the same study.
    sr_files = list((worker.data_dir / "sr").rglob("*.dcm"))
    assert [p for p in sr_files if row["sr_sop_instance_uid"] in p.name]
    received = [ds for ds in destination.files() if ds.SOPInstanceUID == row["sr_sop_instance_uid"]]
    assert len(received) == 1
    sr = received[0]
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study_uid
    from worker.sr import read_pneumonia_sr
    assert read_pneumonia_sr(sr)["probability"] == pytest.approx(row["probability"], abs=1e-4)

    # The same instances again: no new row, no new SR, answered Success.
    again = storescu(worker.port, *files)
    assert again.returncode == 0, again.stderr
    assert worker.db_rows("select count(*) from instances where study_uid=?", study_uid)[0][0] == 2
    worker.wait_for(lambda: "duplicate instance" in worker.log(), what="duplicate logged")
    time.sleep(1.5)  # longer than the quiet period: a re-score would have happened by now
    assert len([r for r in worker.results() if r["study_uid"] == study_uid]) == 1
    assert worker.db_rows("select revision, status from studies where study_uid=?", study_uid) == [(1, "done")]
    assert worker.db_rows("select count(*) from outbox where study_uid=?", study_uid)[0][0] == 1
    assert len([ds for ds in destination.files() if ds.StudyInstanceUID == study_uid]) == 1

    # No patient name, ID or birth date in the INFO log; UIDs are there.
    log = worker.log()
    assert study_uid in log
    for phi in (PHI_NAME, "Zyxwvut", "Phiname", PHI_ID, PHI_BIRTH):
        assert phi not in log


@pytest.mark.parametrize("encoder, syntax, options", [
    ("dcmtk-jpeg-lossless-sv1", "1.2.840.10008.1.2.4.70", ("-xs",)),
    ("gdcm-j2k-lossless", "1.2.840.10008.1.2.4.90", ("-xv",)),
    ("dcmtk-rle", "1.2.840.10008.1.2.5", ("-xr",)),
    ("dcmtk-jpeg-ls-lossless", "1.2.840.10008.1.2.4.80", ("-xt",)),
    ("dcmtk-deflated", "1.2.840.10008.1.2.1.99", ("-xd",)),
    ("dcmtk-big-endian", "1.2.840.10008.1.2.2", ("-xb",)),
])
def test_compressed_transfer_syntax_scores_like_uncompressed(worker, kaggle_jpegs, tmp_path, encoder, syntax, options):
    jpeg = kaggle_jpegs["NORMAL"][3]
    plain = wrap_jpeg(jpeg, tmp_path / "plain.dcm", study_uid=generate_uid())
    source = wrap_jpeg(jpeg, tmp_path / "src.dcm", study_uid=generate_uid())
    study_uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    encoded = encode_with_tool(encoder, source, tmp_path / "encoded.dcm")
    assert pydicom.dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    sent = storescu(worker.port, plain, encoded, options=options)
    assert sent.returncode == 0, sent.stderr + sent.stdout
    plain_uid = pydicom.dcmread(plain, stop_before_pixels=True).StudyInstanceUID
    compressed = result_for(worker, study_uid)[0]
    reference = result_for(worker, plain_uid)[0]
    assert compressed["status"] == "done", compressed
    assert compressed["probability"] == pytest.approx(reference["probability"], abs=1e-5)
    # Stored as received: the spool file keeps the compressed transfer syntax (no transcoding).
    stored = worker.db_rows("select transfer_syntax, path from instances where study_uid=?", study_uid)
    assert stored[0][0] == syntax
    assert pydicom.dcmread(stored[0][1], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def test_bad_instances_recorded_listener_survives(worker, kaggle_jpegs, tmp_path):
    study_uid = generate_uid()
    jpeg = kaggle_jpegs["NORMAL"][0]
    garbage = wrap_jpeg(jpeg, tmp_path / "garbage.dcm", study_uid=study_uid)
    ds = pydicom.dcmread(garbage)
    ds.PixelData = b"\x01\x02" * 10  # far too short for Rows x Columns
    ds.save_as(garbage)
    no_pixels = wrap_jpeg(jpeg, tmp_path / "nopix.dcm", study_uid=study_uid)
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    lateral = wrap_jpeg(jpeg, tmp_path / "lat.dcm", study_uid=study_uid, ViewPosition="LL")
    knee = wrap_jpeg(jpeg, tmp_path / "knee.dcm", study_uid=study_uid, BodyPartExamined="KNEE")
    sent = storescu(worker.port, garbage, no_pixels, lateral, knee)
    assert sent.returncode == 0, sent.stderr
    row = result_for(worker, study_uid)[0]
    assert row["status"] == "no_eligible_images"
    # no image assessed: a "not analysed" SR, no probability
    assert row["probability"] is None and row["sr_sop_instance_uid"] and row["label"] == "NOT_ASSESSED"
    assert row["assessed"] is False and {"view_position", "body_part", "undecodable"} <= set(row["not_assessed_reasons"])
    assert set(row["reasons"]) >= {"view_position", "body_part"} and sum(row["reasons"].values()) == 4
    reasons = dict(worker.db_rows("select path, reason from instances where study_uid=?", study_uid))
    assert all(reasons.values()) and len(reasons) == 4
    assert all(os.path.exists(p) for p in reasons)  # kept on disk
    # The listener is still up and the next association works.
    assert worker.echo()
    good_study = generate_uid()
    good = wrap_jpeg(jpeg, tmp_path / "good.dcm", study_uid=good_study)
    assert storescu(worker.port, good).returncode == 0
    assert result_for(worker, good_study)[0]["status"] == "done"



def test_late_new_instance_rescored_as_next_sr_revision(worker, destination, kaggle_jpegs, tmp_path):
    study_uid = generate_uid()
    first = wrap_jpeg(kaggle_jpegs["NORMAL"][5], tmp_path / "a.dcm", study_uid=study_uid)
    assert storescu(worker.port, first).returncode == 0
    rev1 = result_for(worker, study_uid, delivered=1)[0]
    assert rev1["revision"] == 1 and rev1["n_scored"] == 1
    late = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][6], tmp_path / "b.dcm", study_uid=study_uid)
    assert storescu(worker.port, late).returncode == 0
    rev2 = worker.wait_for(lambda: [r for r in worker.results() if r["study_uid"] == study_uid
                                    and r["revision"] == 2 and r["delivered"] == 1], what="revision 2")
    assert len([r for r in worker.results() if r["study_uid"] == study_uid]) == 1  # one result row, updated
    assert rev2[0]["n_scored"] == 2 and rev2[0]["sr_sop_instance_uid"] != rev1["sr_sop_instance_uid"]
    srs = [ds for ds in destination.files() if ds.StudyInstanceUID == study_uid]
    assert sorted(int(ds.InstanceNumber) for ds in srs) == [1, 2]
    assert len({ds.SeriesInstanceUID for ds in srs}) == 1  # revisions share the SR series
