"""worker/metrics.py, the watermark of worker/store/spool.py and the queries of worker/store/overview.py
on real files and real SQLite (the HTTP face over the network: tests/system/test_http.py)."""

from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from testkit.dicom_factory import make_dataset, synthetic_radiograph
from worker.errors import DiskFull
from worker.metrics import Metrics, Outcome
from worker.net.status import OUT_OF_RESOURCES, store_status
from worker.receiver import Received, Receiver
from worker.settings import load_settings
from worker.store import overview
from worker.store.db import Database
from worker.store.spool import DiskWatermark, Spool


def samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}


def dicom_bytes() -> bytes:
    ds = make_dataset(synthetic_radiograph(64, 48, 12, seed=1))
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_receiver(tmp_path, min_free_bytes: int):
    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path / "data"}"'})
    db = Database(settings.storage.url)
    return Receiver(settings, db, Spool(settings.storage.data_dir, min_free_bytes), Metrics()), db


def test_each_service_counts_in_its_own_registry():
    a, b = Metrics(), Metrics()
    a.received(Outcome.STORED)
    a.received(Outcome.REFUSED, "disk_below_watermark")
    assert samples(a)[("cxr_worker_instances_received_total", (("outcome", "stored"), ("reason", "")))] == 1
    assert not [k for k in samples(b) if k[0] == "cxr_worker_instances_received_total"]
    assert all(name.startswith("cxr_worker_") for name, _ in samples(a))


def test_the_watermark_is_measured_at_most_once_per_max_age(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    off = DiskWatermark(tmp_path, 0)
    assert off.below() is None
    low = DiskWatermark(tmp_path, free + 10**15, max_age=60)
    first = low.below()
    assert first is not None and first.below_watermark and first.free_bytes > 0
    assert low.measure() is first  # cached
    assert DiskWatermark(tmp_path, max(1, free // 2)).below() is None
    fresh = DiskWatermark(tmp_path, 1, max_age=0)
    assert fresh.measure() is not fresh.measure()


def test_below_the_watermark_a_store_is_refused_before_anything_is_kept(tmp_path):
    receiver, db = make_receiver(tmp_path, min_free_bytes=10**18)  # more than any disk has
    try:
        tmp = receiver.spool.incoming / "arriving.dcm"
        tmp.write_bytes(dicom_bytes())
        with pytest.raises(DiskFull) as refused:
            receiver.store(tmp, "MODALITY")
        assert store_status(refused.value) == OUT_OF_RESOURCES
        assert not tmp.exists() and list(receiver.spool.incoming.iterdir()) == []
        assert [p for p in receiver.spool.spool.rglob("*") if p.is_file()] == []
        assert overview.status_report(db)["instances"] == 0
        assert samples(receiver.metrics)[("cxr_worker_instances_received_total",
                                          (("outcome", "refused"), ("reason", "disk_below_watermark")))] == 1
        receiver.spool.watermark.min_free_bytes = 0  # space is back (the watermark off): stored, no restart
        tmp.write_bytes(dicom_bytes())
        assert receiver.store(tmp, "MODALITY") is Received.STORED
        assert overview.status_report(db)["instances"] == 1
    finally:
        db.dispose()


def test_database_gauges_at_scrape_time_and_database_up_0_when_it_cannot_be_read(tmp_path):
    receiver, db = make_receiver(tmp_path, 0)
    try:
        for _ in range(3):
            tmp = receiver.spool.incoming / f"{generate_uid()}.dcm"
            tmp.write_bytes(dicom_bytes())
            receiver.store(tmp, "MODALITY")
        metrics = Metrics()
        metrics.watch_database(lambda: overview.gauges(db))
        got = samples(metrics)
        assert got[("cxr_worker_database_up", ())] == 1
        assert got[("cxr_worker_studies", (("state", "receiving"),))] == 3
        assert got[("cxr_worker_studies", (("state", "done"),))] == 0
    finally:
        db.dispose()
    (tmp_path / "garbage.db").write_bytes(b"not a database " * 512)  # a database that cannot be read
    broken = Database(f"sqlite:///{tmp_path / 'garbage.db'}", create=False)
    metrics = Metrics()
    metrics.watch_database(lambda: overview.gauges(broken))
    got = samples(metrics)
    assert got[("cxr_worker_database_up", ())] == 0
    assert not [k for k in got if k[0] in ("cxr_worker_studies", "cxr_worker_outbox_items")]
    broken.dispose()


def test_not_assessed_reason_is_one_function():
    done = SimpleNamespace(status="done", reasons=json.dumps({"lateral_view": 1}), error=None)
    none_eligible = SimpleNamespace(status="no_eligible_images", reasons=json.dumps({"not_chest": 2}),
                                    error="no eligible image: not_chest=2")
    failed = SimpleNamespace(status="failed", reasons=None, error="sr_failed: ValueError: x")
    assert overview.not_assessed_reason(None) is None
    assert overview.not_assessed_reason(done) is None
    assert overview.not_assessed_reason(none_eligible) == "not_chest"
    assert overview.not_assessed_reason(failed) == "sr_failed"
    # results since #10 carry their coded reasons
    declined = SimpleNamespace(status="no_eligible_images", reasons=json.dumps({"body_part": 1}), error=None,
                               assessed=False, probability=None,
                               not_assessed_reasons=json.dumps(["body_part", "out_of_distribution"]))
    assert overview.not_assessed_reason(declined) == "body_part, out_of_distribution"
    scored = SimpleNamespace(status="done", reasons=None, error=None, assessed=True, probability=0.9,
                             not_assessed_reasons="[]")
    assert overview.not_assessed_reason(scored) is None


def test_decode_and_study_metrics_accumulate():
    m = Metrics()
    m.decoded("1.2.840.10008.1.2.4.50", 0.02)
    m.decoded(None, 0.001)
    m.study_concluded("done", 1.5, 4.0, {"lateral_view": 2})
    got = samples(m)
    assert got[("cxr_worker_decode_seconds_count", (("transfer_syntax", "1.2.840.10008.1.2.4.50"),))] == 1
    assert got[("cxr_worker_decode_seconds_count", (("transfer_syntax", "none"),))] == 1
    assert got[("cxr_worker_instances_declined_total", (("reason", "lateral_view"),))] == 2
    assert got[("cxr_worker_end_to_end_seconds_sum", ())] == pytest.approx(4.0)
