"""Concurrency with real peers: parallel DCMTK storescu associations into one `cxr-worker serve`.

Every instance is stored (exit status 0, one row each), every study is scored exactly once and its
one SR reaches the DCMTK storescp destination, and SQLite never reports "database is locked".
Real Kaggle films wrapped as DX (worker/wrap.wrap_image_as_dicom).
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from testkit.worker_process import StoreSCP, WorkerProcess, db_rows, dcmtk, wrap_jpeg

pytestmark = pytest.mark.dcmtk

ASSOCIATIONS = 8
STUDIES_PER_ASSOCIATION = 4
SHARED_STUDIES = 2          # studies whose images arrive on several associations at once
SHARED_ASSOCIATIONS = 4


@pytest.fixture(scope="module")
def films(kaggle_root: Path) -> list[Path]:
    jpegs = sorted((kaggle_root / "train" / "NORMAL").glob("*.jpeg"))[:24]
    jpegs += sorted((kaggle_root / "train" / "PNEUMONIA").glob("*.jpeg"))[:24]
    assert len(jpegs) == 48
    return jpegs



def _storescu_parallel(port: int, batches: list[list[Path]]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"MOD{i:02d}", "-aec", "CXR_WORKER", "127.0.0.1",
                               str(port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i, files in enumerate(batches)]
    done = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return done


def test_parallel_associations_every_instance_stored_every_study_scored_once(tmp_path, films):
    # 8 associations x 4 single-image studies of their own, sent at the same moment ...
    own: list[list[Path]] = []
    study_of: dict[Path, str] = {}
    jpeg = iter(films)
    for a in range(ASSOCIATIONS):
        batch = []
        for s in range(STUDIES_PER_ASSOCIATION):
            uid = generate_uid()
            path = wrap_jpeg(next(jpeg), tmp_path / "own" / f"{a}-{s}.dcm", study_uid=uid)
            batch.append(path)
            study_of[path] = uid
        own.append(batch)
    # ... and then 2 studies whose 4 images each come in on 4 associations at once (the first
    # instance of one study created concurrently).
    shared_uids = [generate_uid() for _ in range(SHARED_STUDIES)]
    shared: list[list[Path]] = [[] for _ in range(SHARED_ASSOCIATIONS)]
    for k, uid in enumerate(shared_uids):
        for a in range(SHARED_ASSOCIATIONS):
            path = wrap_jpeg(next(jpeg), tmp_path / "shared" / f"{k}-{a}.dcm", study_uid=uid)
            shared[a].append(path)
            study_of[path] = uid
    all_studies = set(study_of.values())
    n_instances = len(study_of)
    assert len(all_studies) == ASSOCIATIONS * STUDIES_PER_ASSOCIATION + SHARED_STUDIES

    with StoreSCP(tmp_path / "dest") as dest, \
         WorkerProcess(tmp_path / "data", destinations=[dest.destination()], quiet=2.0) as worker:
        started = time.monotonic()
        results = _storescu_parallel(worker.port, own) + _storescu_parallel(worker.port, shared)
        send_s = time.monotonic() - started
        for r in results:
            assert r.returncode == 0, r.stdout[-2000:]

        stored = dict(db_rows(worker.data_dir, "select sop_instance_uid, study_uid from instances"))
        assert len(stored) == n_instances
        assert {p: stored.get(_sop(p)) for p in study_of} == study_of

        def all_delivered():
            rows = db_rows(worker.data_dir, "select study_uid, status from outbox")
            return rows if len(rows) == len(all_studies) and all(s == "sent" for _, s in rows) else None
        worker.wait_for(all_delivered, timeout=90, what="every SR delivered")
        time.sleep(0.5)

        results_rows = worker.results()
        assert Counter(r["study_uid"] for r in results_rows) == Counter(all_studies)  # one result per study
        assert all(r["status"] == "done" and r["revision"] == 1 for r in results_rows), results_rows
        n_scored = {r["study_uid"]: r["n_scored"] for r in results_rows}
        assert all(n_scored[uid] == SHARED_ASSOCIATIONS for uid in shared_uids), n_scored
        studies = db_rows(worker.data_dir, "select study_uid, status, revision, n_instances from studies")
        assert len(studies) == len(all_studies)
        assert all(status == "done" and rev == 1 for _, status, rev, _ in studies)
        assert sum(n for *_, n in studies) == n_instances
        srs = dest.files()
        assert len(srs) == len(all_studies)
        assert {ds.StudyInstanceUID for ds in srs} == all_studies
        log = worker.log()
    assert worker.process.returncode == 0
    for bad in ("database is locked", "OperationalError", "database busy", "Traceback", "0xA700"):
        assert bad not in log, f"{bad!r} in the worker log:\n{log[-4000:]}"
    print(f"{n_instances} instances over {ASSOCIATIONS + SHARED_ASSOCIATIONS} associations in {send_s:.1f} s")


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
