"""A real Orthanc PACS pushes a study to the worker; the SR comes back into the same Orthanc study."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.orthanc import OrthancServer
from testkit.worker_process import WorkerProcess, free_port, wrap_jpeg

pytestmark = pytest.mark.orthanc


def test_orthanc_push_to_worker_and_sr_back(kaggle_jpegs, tmp_path):
    worker_port = free_port()
    with OrthancServer(modalities={"cxrworker": ["CXR_WORKER", "127.0.0.1", worker_port]}) as pacs:
        destination = {"name": "orthanc", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
        with WorkerProcess(tmp_path / "data", port=worker_port, destinations=[destination],
                           env={"CXR_WORKER__NETWORK__ALLOWED_CALLING_AETS": f'["{pacs.aet}", "TEST_SCU"]'}) as worker:
            assert pacs.echo_modality("cxrworker")
            from worker.net.scu import echo
            assert echo("127.0.0.1", worker_port, "CXR_WORKER", "INTRUDER", timeout=5) != 0  # not allowed
            study_uid = generate_uid()
            ids = [pacs.upload(wrap_jpeg(jpeg, tmp_path / f"{i}.dcm", study_uid=study_uid, AccessionNumber="ORTH1"))
                   for i, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][4:6])]
            pacs.store_to_modality("cxrworker", ids)

            def sr_in_pacs():
                found = [i for i in pacs.study_instances(study_uid) if i["ID"] not in ids]
                return found or None

            found = worker.wait_for(sr_in_pacs, timeout=60, what="SR in Orthanc")
            assert len(found) == 1
            sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(found[0]["ID"])))
            assert sr.Modality == "SR" and sr.StudyInstanceUID == study_uid and sr.AccessionNumber == "ORTH1"
            rows = [r for r in worker.results() if r["study_uid"] == study_uid]
            assert len(rows) == 1 and rows[0]["n_scored"] == 2 and sr.SOPInstanceUID == rows[0]["sr_sop_instance_uid"]
            from worker.sr import read_pneumonia_sr
            assert read_pneumonia_sr(sr)["probability"] == pytest.approx(rows[0]["probability"], abs=1e-4)
            # Orthanc pushing the same study again changes nothing: still one SR in the PACS.
            pacs.store_to_modality("cxrworker", ids)
            import time
            time.sleep(2.0)
            assert len(pacs.study_instances(study_uid)) == 3
        assert worker.process.returncode == 0


def test_the_worker_files_its_heatmap_objects_and_the_sr_in_the_orthanc_study(kaggle_jpegs, tmp_path):
    """serve -> a real Orthanc: the Segmentation and the key image of each image, then the SR that
    references them, all in the source's study; Orthanc renders the key image in colour."""
    import numpy as np
    from PIL import Image

    from worker.sr import read_pneumonia_sr

    with OrthancServer() as pacs:
        destination = {"name": "orthanc", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
        with WorkerProcess(tmp_path / "data", destinations=[destination],
                           env={"CXR_WORKER__HEATMAP__STUDIES": "positive"}) as worker:
            study_uid = generate_uid()
            films = [wrap_jpeg(jpeg, tmp_path / f"{i}.dcm", study_uid=study_uid)
                     for i, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][6:8])]
            for film in films:  # the PACS holds the films; the modality sent them to the worker too
                pacs.upload(film)
            from testkit.worker_process import storescu
            assert storescu(worker.port, *films).returncode == 0
            worker.wait_for(lambda: len(pacs.study_instances(study_uid)) >= 2 + 5, timeout=120,
                            what="SEGs, key images and the SR in Orthanc")
            assert worker.results()[0]["label"] == "PNEUMONIA"
        tags = {i["ID"]: pacs.instance_tags(i["ID"]) for i in pacs.study_instances(study_uid)}
        modalities = sorted(t["Modality"] for t in tags.values())
        assert modalities == ["DX", "DX", "OT", "OT", "SEG", "SEG", "SR"], modalities
        sr_id = next(i for i, t in tags.items() if t["Modality"] == "SR")
        sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_id)))
        evidence = read_pneumonia_sr(sr)["evidence"]
        in_pacs = {t["SOPInstanceUID"] for t in tags.values()}
        assert len(evidence) == 2 and all(e["segmentation"]["sop_instance_uid"] in in_pacs and
                                          e["key_image"]["sop_instance_uid"] in in_pacs for e in evidence)
        for key_id in (i for i, t in tags.items() if t["Modality"] == "OT"):
            with Image.open(io.BytesIO(pacs._request("GET", f"/instances/{key_id}/preview"))) as image:
                rgb = np.asarray(image.convert("RGB")).astype(int)
            colour = (np.abs(rgb[..., 0] - rgb[..., 1]) > 30) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 30)
            assert colour.sum() > 1000, "Orthanc's preview of the key image shows no colour overlay"
