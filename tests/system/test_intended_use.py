"""Intended use end to end: the out-of-distribution set (pydicom-data images re-wrapped as CHEST PA DX,
tests/testkit/ood_set.py) through `classify` and through `serve` (DCMTK storescu in, DCMTK storescp
receiving the SR); the "not analysed" SR checked by dciodvfy, highdicom and a real Orthanc."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.env import REPO_ROOT, require_tool
from testkit.ood_set import ADULT_CHEST, build_ood_set, source_path
from testkit.worker_process import WorkerProcess, storescu, wrap_jpeg

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def ood_set(tmp_path_factory):
    return build_ood_set(tmp_path_factory.mktemp("ood"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory, destination):
    with WorkerProcess(tmp_path_factory.mktemp("worker") / "data", destinations=[destination.destination()]) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def _dciodvfy_errors(path) -> list[str]:
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_classify_declines_every_ood_file_with_its_reason_and_the_adult_chest_by_age(ood_set, kaggle_jpegs):
    files = [c.dicom for c in ood_set] + [c.png for c in ood_set] + [source_path(ADULT_CHEST),
                                                                       kaggle_jpegs["NORMAL"][0]]
    out = subprocess.run([sys.executable, "-m", "worker", "classify", "--json", *map(str, files)],
                         capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {row["path"]: row for row in map(json.loads, out.stdout.splitlines())}
    for case in ood_set:
        dcm, png = rows[str(case.dicom)], rows[str(case.png)]
        for row in (dcm, png):
            assert row["assessed"] is False and row["label"] == "NOT_ASSESSED", row
            assert row["not_assessed_reasons"] == ["out_of_distribution"], row  # the header says CHEST PA DX
            assert row["in_distribution"] is False and row["ood_score"] > row["ood_threshold"]
            assert 0.0 <= row["probability"] <= 1.0  # still reported
        assert dcm["ood_score"] == pytest.approx(png["ood_score"], abs=1e-3)
    adult = rows[str(source_path(ADULT_CHEST))]
    assert adult["assessed"] is False and "age" in adult["not_assessed_reasons"]
    film = rows[str(kaggle_jpegs["NORMAL"][0])]
    assert film["assessed"] is True and film["not_assessed_reasons"] == [] and film["in_distribution"] is True
    assert film["label"] in ("NORMAL", "PNEUMONIA")


def test_serve_sends_a_not_analysed_sr_for_the_ood_set_and_a_mixed_study(worker, destination, ood_set,
                                                                          kaggle_jpegs, tmp_path):
    from worker.sr import read_pneumonia_sr

    sent = storescu(worker.port, *[c.dicom for c in ood_set])
    assert sent.returncode == 0, sent.stderr
    study_uids = {pydicom.dcmread(c.dicom, stop_before_pixels=True).StudyInstanceUID for c in ood_set}
    assert len(study_uids) == len(ood_set)  # one study per file

    def all_delivered():
        rows = [r for r in worker.results() if r["study_uid"] in study_uids and r["delivered"] >= 1]
        return rows if len(rows) == len(study_uids) else None

    rows = worker.wait_for(all_delivered, timeout=180, what="SRs of the OOD set delivered")
    received = {ds.SOPInstanceUID: ds for ds in destination.files()}
    for row in rows:
        assert row["status"] == "no_eligible_images" and row["assessed"] is False and row["label"] == "NOT_ASSESSED"
        assert row["not_assessed_reasons"] == ["out_of_distribution"] and row["probability"] is None
        assert row["in_distribution"] is False and row["ood_score"] > row["ood_threshold"]
        sr = read_pneumonia_sr(received[row["sr_sop_instance_uid"]])
        assert sr["assessed"] is False and sr["summary"] == "No algorithms succeeded; without findings"
        assert sr["not_assessed_reasons"] == ["out_of_distribution"] and sr["probability"] is None
        assert sr["declined_images"][0]["ood_score"] == pytest.approx(row["ood_score"], abs=1e-3)

    # a study mixing an assessed film and a declined image: a finding, and the declined image's reasons
    study_uid = generate_uid()
    film = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][3], tmp_path / "film.dcm", study_uid=study_uid)
    odd = pydicom.dcmread(ood_set[0].dicom)
    odd.StudyInstanceUID, odd.SOPInstanceUID = study_uid, generate_uid()
    odd.file_meta.MediaStorageSOPInstanceUID = odd.SOPInstanceUID
    odd.save_as(tmp_path / "odd.dcm")
    assert storescu(worker.port, film, tmp_path / "odd.dcm").returncode == 0
    row = worker.wait_for(lambda: next((r for r in worker.results() if r["study_uid"] == study_uid
                                        and r["delivered"] >= 1), None), what="mixed study SR")
    assert row["status"] == "done" and row["assessed"] is True and row["n_scored"] == 1
    assert row["in_distribution"] is True and row["reasons"] == {"out_of_distribution": 1}
    sr_ds = next(ds for ds in destination.files() if ds.SOPInstanceUID == row["sr_sop_instance_uid"])
    sr = read_pneumonia_sr(sr_ds)
    assert sr["assessed"] is True and sr["probability"] == pytest.approx(row["probability"], abs=1e-4)
    assert sr["summary"].startswith("Not all algorithms succeeded")
    assert [d["reasons"] for d in sr["declined_images"]] == [["out_of_distribution"]]
    path = tmp_path / "mixed-sr.dcm"
    sr_ds.save_as(path)
    assert _dciodvfy_errors(path) == []

    status = json.loads(worker.cli("status", "--json").stdout)
    assert status["not_assessed_studies"] >= len(ood_set)
    assert status["not_assessed_reasons"]["out_of_distribution"] >= len(ood_set)


def test_the_not_analysed_sr_passes_dciodvfy(worker, ood_set, tmp_path):
    study_uid = pydicom.dcmread(ood_set[1].dicom, stop_before_pixels=True).StudyInstanceUID
    storescu(worker.port, ood_set[1].dicom)
    row = worker.wait_for(lambda: next((r for r in worker.results() if r["study_uid"] == study_uid
                                        and r["sr_path"]), None), what="not analysed SR")
    assert _dciodvfy_errors(row["sr_path"]) == []


@pytest.mark.orthanc
def test_orthanc_accepts_the_not_analysed_sr(ood_set, tmp_path):
    from testkit.orthanc import OrthancServer
    from worker.sr import read_pneumonia_sr

    with OrthancServer() as pacs:
        destination = {"name": "orthanc", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
        with WorkerProcess(tmp_path / "data", destinations=[destination]) as worker:
            case = ood_set[2]
            study_uid = pydicom.dcmread(case.dicom, stop_before_pixels=True).StudyInstanceUID
            ids = [pacs.upload(case.dicom)]  # the image in the PACS, as the worker's SR will reference it
            assert storescu(worker.port, case.dicom).returncode == 0

            def sr_in_pacs():
                found = [i for i in pacs.study_instances(study_uid) if i["ID"] not in ids]
                return found or None

            found = worker.wait_for(sr_in_pacs, timeout=90, what="not analysed SR in Orthanc")
            sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(found[0]["ID"])))
            assert sr.Modality == "SR" and sr.StudyInstanceUID == study_uid
            assert read_pneumonia_sr(sr)["assessed"] is False
        assert worker.process.returncode == 0


def test_outside_flag_scores_the_adult_film_and_marks_it(kaggle_jpegs, tmp_path, destination):
    """intended_use.outside = "flag": a chest film of a 40-year-old (by birth date) is scored, its
    result and classify line marked "age"; a lateral view likewise. The pixel check still declines."""
    from worker.sr import read_pneumonia_sr

    env = {"CXR_WORKER__INTENDED_USE__OUTSIDE": "flag"}
    with WorkerProcess(tmp_path / "data", destinations=[destination.destination()], env=env) as worker:
        study_uid = generate_uid()
        adult = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][5], tmp_path / "adult.dcm", study_uid=study_uid,
                          PatientBirthDate="19800101", ViewPosition="LL")
        assert storescu(worker.port, adult).returncode == 0
        row = worker.wait_for(lambda: next((r for r in worker.results() if r["study_uid"] == study_uid
                                            and r["delivered"] >= 1), None), what="flagged study")
        assert row["status"] == "done" and row["assessed"] is True and row["not_assessed_reasons"] == []
        assert row["outside_intended_use"] == ["view_position", "age"] and row["label"] in ("NORMAL", "PNEUMONIA")
        sr = next(ds for ds in destination.files() if ds.SOPInstanceUID == row["sr_sop_instance_uid"])
        assert read_pneumonia_sr(sr)["probability"] == pytest.approx(row["probability"], abs=1e-4)
        out = worker.cli("classify", "--json", str(adult))
        line = json.loads(out.stdout)
        assert line["assessed"] is True and line["outside_intended_use"] == ["view_position", "age"]
    assert worker.process.returncode == 0
