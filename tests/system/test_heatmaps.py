"""Heatmaps end to end: `serve` (DCMTK storescu in, DCMTK storescp out) sends each positive study's
fractional Segmentation and key image before the SR that references them, exactly once, across a
restart and a late re-score; `classify --heatmap` writes the overlays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.env import REPO_ROOT
from testkit.worker_process import StoreSCP, WorkerProcess, storescu, wait_files, wrap_jpeg

pytestmark = pytest.mark.dcmtk

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
HEATMAPS_ON = {"CXR_WORKER__HEATMAP__STUDIES": "positive"}


def big_film(jpeg: Path, out: Path, *, rows: int = 720, cols: int = 560, **attributes) -> Path:
    """A Kaggle film enlarged to a non-square size (so undoing the 224 squash is visible), as DX."""
    grey = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    png = out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(png), cv2.resize(grey, (cols, rows), interpolation=cv2.INTER_CUBIC))
    return wrap_jpeg(png, out, **attributes)


def received(scp: StoreSCP) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for ds in scp.files():
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def outbox_rows(worker: WorkerProcess, study_uid: str) -> list[tuple]:
    return worker.db_rows("SELECT sr_sop_instance_uid, kind, evidence_for, status, sent, attempts FROM outbox "
                          "WHERE study_uid = ? ORDER BY id", study_uid)


def test_a_positive_study_gets_its_objects_before_the_sr_and_a_negative_one_only_the_sr(kaggle_jpegs, tmp_path):
    study, normal = generate_uid(), generate_uid()
    films = [big_film(kaggle_jpegs["PNEUMONIA"][i], tmp_path / f"p{i}.dcm", study_uid=study) for i in (0, 1)]
    negative = big_film(kaggle_jpegs["NORMAL"][0], tmp_path / "n.dcm", study_uid=normal)
    with StoreSCP(tmp_path / "dest") as scp, \
            WorkerProcess(tmp_path / "data", destinations=[scp.destination()], env=HEATMAPS_ON) as worker:
        assert storescu(worker.port, *films, negative).returncode == 0
        worker.wait_for(lambda: len(worker.results()) == 2 and all(
            r[3] == "sent" for s in (study, normal) for r in outbox_rows(worker, s)) and
            all(outbox_rows(worker, s) for s in (study, normal)), timeout=120, what="all delivered")
        results = {r["study_uid"]: r for r in worker.results()}
        assert results[study]["label"] == "PNEUMONIA" and results[normal]["label"] == "NORMAL"
        got = received(scp)
        sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in films}
        # exactly once: two objects per assessed image of the positive study, one SR per study
        assert sorted(len(v) for v in got.values()) == [2, 2, 2] and set(got) == {SEG, SC, SR}
        assert {str(ds.StudyInstanceUID) for ds in got[SEG] + got[SC]} == {study}
        # in order: every object was accepted before its SR went out
        rows = outbox_rows(worker, study)
        sr_rows = [r for r in rows if r[1] is None]
        assert len(sr_rows) == 1 and all(r[2] == sr_rows[0][0] and r[4] < sr_rows[0][4] for r in rows if r[1])
        assert [r for r in outbox_rows(worker, normal) if r[1]] == []
        # the SR references the objects and says where
        sr = next(ds for ds in got[SR] if str(ds.StudyInstanceUID) == study)
        from worker.sr import read_pneumonia_sr

        evidence = read_pneumonia_sr(sr)["evidence"]
        assert {e["source_sop_instance_uid"] for e in evidence} == set(sources)
        assert {e["segmentation"]["sop_instance_uid"] for e in evidence} == {str(ds.SOPInstanceUID) for ds in got[SEG]}
        assert {e["key_image"]["sop_instance_uid"] for e in evidence} == {str(ds.SOPInstanceUID) for ds in got[SC]}
        for e in evidence:
            xs, ys = zip(*e["region"])
            assert e["region"][0] == e["region"][-1] and max(xs) <= 560 and max(ys) <= 720
        # the map at the source's own geometry, the values the scoring pass computed
        from dicom_io import load_display_image, map_to_image, to_model_input
        from trainer.cam import relevance
        from worker.scoring.runner import ModelRunner

        runner = ModelRunner(device="cpu", decode_threads=1, heatmaps=True)
        try:
            for seg_ds in got[SEG]:
                seg = hd.seg.Segmentation.from_dataset(seg_ds)
                source_uid = str(seg_ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
                assert (seg_ds.Rows, seg_ds.Columns) == (720, 560)
                image = load_display_image(films[[str(pydicom.dcmread(f).SOPInstanceUID) for f in films].index(source_uid)])
                _, _, cams = runner.predict_all(to_model_input(image.pixels)[np.newaxis])
                expected = map_to_image(relevance(cams[0]), 720, 560)
                values = seg.pixel_array.astype(np.float32).reshape(720, 560) / float(seg_ds.MaximumFractionalValue)
                assert np.abs(values - expected).max() <= 2 / 255 + 1e-6
        finally:
            runner.close()
        # the web page's overlay exists for each mapped image, and the study page shows it
        for uid in sources:
            jpeg = tmp_path / "data" / "heatmaps" / study / f"{uid}.jpg"
            assert jpeg.is_file() and jpeg.read_bytes()[:2] == b"\xff\xd8"
            page = worker.http_get(f"/studies/{study}/instances/{uid}/heatmap.jpg")
            assert page.status_code == 200 and page.headers["content-type"] == "image/jpeg"
        assert worker.http_get(f"/studies/{study}").text.count('class="heatmap"') == 2
        # the decode processes kept the previews in this worker's folder, and the scorer removed them all
        folders = list((tmp_path / "data" / "incoming").glob("*/previews"))
        assert len(folders) == 1 and list(folders[0].iterdir()) == []


def test_objects_survive_a_restart_while_the_destination_is_down_and_a_late_image_revises_them(kaggle_jpegs, tmp_path):
    study = generate_uid()
    first = big_film(kaggle_jpegs["PNEUMONIA"][2], tmp_path / "a.dcm", study_uid=study)
    late = big_film(kaggle_jpegs["PNEUMONIA"][3], tmp_path / "b.dcm", study_uid=study)
    scp = StoreSCP(tmp_path / "dest")
    worker = WorkerProcess(tmp_path / "data", destinations=[scp.destination()], env=HEATMAPS_ON)
    with worker:
        assert storescu(worker.port, first).returncode == 0
        worker.wait_for(lambda: any(r[5] > 0 for r in outbox_rows(worker, study)), timeout=120,
                        what="a failed delivery try (destination down)")
        rows = outbox_rows(worker, study)
        assert [r[1] for r in rows] == ["segmentation", "key_image", None]
        assert rows[2][5] == 0, "the SR must not be tried before its objects are delivered"
        worker.kill()  # SIGKILL: whatever it held is taken back by the next worker
    with scp, WorkerProcess(tmp_path / "data", destinations=[scp.destination()], env=HEATMAPS_ON,
                            port=worker.port) as again:
        again.wait_for(lambda: all(r[3] == "sent" for r in outbox_rows(again, study)), timeout=90,
                       what="delivered after the restart")
        got = received(scp)
        assert {k: len(v) for k, v in got.items()} == {SEG: 1, SC: 1, SR: 1}
        # a late image: revision 2 re-scores the study, new objects for both images, a new SR that references them
        assert storescu(again.port, late).returncode == 0
        again.wait_for(lambda: len(outbox_rows(again, study)) == 3 + 5 and
                       all(r[3] == "sent" for r in outbox_rows(again, study)), timeout=120, what="revision 2 delivered")
        got = received(scp)
        assert {k: len(v) for k, v in got.items()} == {SEG: 3, SC: 3, SR: 2}
        from worker.sr import read_pneumonia_sr

        newest = max(got[SR], key=lambda ds: int(ds.InstanceNumber))
        assert int(newest.InstanceNumber) == 2
        referenced = {e["segmentation"]["sop_instance_uid"] for e in read_pneumonia_sr(newest)["evidence"]}
        revision2 = {str(ds.SOPInstanceUID) for ds in got[SEG] if int(ds.InstanceNumber) == 2}
        assert len(referenced) == 2 and referenced == revision2
        assert len({str(ds.SOPInstanceUID) for ds in got[SEG] + got[SC] + got[SR]}) == 3 + 3 + 2


def test_studies_all_maps_a_negative_study_and_none_computes_no_map(kaggle_jpegs, tmp_path):
    negative = big_film(kaggle_jpegs["NORMAL"][1], tmp_path / "n.dcm", study_uid=generate_uid())
    for mode, expected in (("all", {SEG, SC, SR}), ("none", {SR})):
        with StoreSCP(tmp_path / f"dest-{mode}") as scp, \
                WorkerProcess(tmp_path / f"data-{mode}", destinations=[scp.destination()],
                              env={"CXR_WORKER__HEATMAP__STUDIES": mode}) as worker:
            assert storescu(worker.port, negative).returncode == 0
            wait_files(scp.out_dir, len(expected), timeout=120)
            worker.wait_for(lambda: worker.results(), timeout=30, what="result")
            assert worker.results()[0]["label"] == "NORMAL"
            assert set(received(scp)) == expected
            assert ("none" == mode) == (not list((tmp_path / f"data-{mode}" / "heatmaps").rglob("*.jpg")))


def test_classify_heatmap_writes_an_overlay_for_each_assessed_file_only(kaggle_jpegs, tmp_path):
    lateral = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][5], tmp_path / "lat.dcm", ViewPosition="LL")
    files = [kaggle_jpegs["PNEUMONIA"][4], kaggle_jpegs["NORMAL"][2], lateral]
    out = subprocess.run([sys.executable, "-m", "worker", "classify", "--json", "--heatmap", str(tmp_path / "maps"),
                          *map(str, files)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}
    for f in files[:2]:
        png = Path(rows[str(f)]["heatmap"])
        assert png.parent == tmp_path / "maps" and png.name == f"{f.name}.png"
        rgb = cv2.imread(str(png), cv2.IMREAD_COLOR)
        assert rgb is not None and rgb.shape[0] >= 224
        b, g, r = (rgb[..., i].astype(int) for i in range(3))
        assert ((np.abs(r - g) > 40) | (np.abs(g - b) > 40)).mean() > 0.01  # colour, not a grey film
    assert rows[str(lateral)]["assessed"] is False and rows[str(lateral)]["heatmap"] is None
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(f"{f.name}.png" for f in files[:2])
