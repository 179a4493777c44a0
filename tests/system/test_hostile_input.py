"""Hostile and broken input over real associations: every C-STORE gets a DEFINED status, the reason is
recorded, the listener never goes down (a C-ECHO after each), and patient names in any character set
are decoded without errors and never logged above DEBUG.

Broken files DCMTK refuses to send go through pynetdicom with STORE_SEND_CHUNKED_DATASET (the bytes
after the file meta are streamed exactly as they are on disk, never re-encoded).

Changed by design (issue 14): a file cut inside Pixel Data was answered 0x0000 and stored as
truncated_pixel_data; it is now refused with 0xC000 like any data set cut short (docs/worker.md,
"Which images are scored"), so the sender's retry brings the whole image.

| input                                   | C-STORE status | recorded as                                     |
|-----------------------------------------|----------------|-------------------------------------------------|
| data set truncated inside the header    | 0xC000         | rejected/ + WARNING log (no usable UIDs)        |
| cut inside Study/SOP Instance UID, a    | 0xC000         | rejected/; no study or instance under any UID;  |
|   sequence, or Pixel Data               |                | the complete resend is stored, scored, its SR   |
|                                         |                | delivered                                       |
| the same instance on two associations   | 0x0000 (both)  | one row, one intact file, matching size         |
|   at the same moment                    |                |                                                 |
| garbage bytes after a valid file meta   | 0xC000         | rejected/ + WARNING log                         |
| no Study/SOP Instance UID               | 0xC000         | rejected/ + WARNING log                         |
| MR/CT presentation context proposed     | (none)         | context rejected at association (abstract syntax not supported); C-ECHO still fine |
| MR SOP Class inside a DX context        | 0x0000         | instances.reason = wrong_sop_class              |
| no SOP Class UID in the data set        | 0x0000         | class taken from the C-STORE command (DX); scored |
| no Pixel Data                           | 0x0000         | instances.reason = no_pixel_data                |
| Rows/Columns 0, or 65535 (> 16384)      | 0x0000         | instances.reason = bad_dimensions (no allocation)|
| Pixel Data shorter than declared        | 0x0000         | instances.reason = truncated_pixel_data         |
| RGB                                     | 0x0000         | instances.reason = unsupported_photometric      |
| multi-frame grey-scale                  | 0x0000         | scored (first frame)                            |
| 200 MB data set                         | 0x0000         | stored streaming (never in memory), scored      |
| non-ASCII patient names, 5 charsets     | 0x0000         | scored; SR carries the name, decoded correctly  |
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from testkit.dicom_factory import MULTIFRAME_GRAYSCALE_WORD_SC, make_dataset, make_rgb_dataset, synthetic_radiograph
from testkit.ood_set import checkpoint_without_detector
from testkit.worker_process import WorkerProcess, wrap_jpeg

DX = "1.2.840.10008.5.1.4.1.1.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def worker(tmp_path_factory, destination):
    root = tmp_path_factory.mktemp("hostile")
    # synthetic pictures (hostile bytes, not pixels): the same weights without the detector, which
    # would rightly decline them (the detector: tests/system/test_intended_use.py)
    model = checkpoint_without_detector(root / "model.safetensors")
    with WorkerProcess(root / "data", quiet=0.5, destinations=[destination.destination()],
                       env={"CXR_WORKER__MODEL__PATH": str(model)}) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]   # never crashed, clean stop



# -- sending exactly the bytes on disk -------------------------------------------------------------
def raw_file(path: Path, body: bytes | None, *, sop_class: str = DX, sop_instance: str | None = None,
             dataset: Dataset | None = None) -> Path:
    """A DICOM file: valid file meta, then ``body`` (any bytes) or ``dataset`` encoded as Explicit LE."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta)
        if dataset is not None:
            from pydicom.filebase import DicomFileLike
            from pydicom.filewriter import write_dataset

            fp = DicomFileLike(handle)
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, dataset)
        if body is not None:
            handle.write(body)
    return path


def send(worker: WorkerProcess, path: Path, sop_class: str = DX, timeout: float = 60) -> int | None:
    """C-STORE the file's bytes (after its meta) as they are; returns the status (None: no response)."""
    from pynetdicom import AE, _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    try:
        assoc = ae.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
        status = rsp.get("Status") if rsp is not None else None
        return None if status is None else int(status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        ae.shutdown()


def dataset_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    buffer = BytesIO()
    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return buffer.getvalue()


def small_dx(**changes) -> Dataset:
    ds = make_dataset(synthetic_radiograph(64, 48, 12))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def reason_of(worker: WorkerProcess, sop_uid: str, timeout: float = 60.0):
    """(eligible, reason) once the study is finished (scoring may revoke eligibility)."""
    def finished():
        rows = worker.db_rows("select i.eligible, i.reason, s.status from instances i join studies s "
                               "on s.study_uid = i.study_uid where i.sop_instance_uid=?", sop_uid)
        return rows if rows and rows[0][2] in ("done", "no_eligible_images", "failed") else None
    eligible, reason, _ = worker.wait_for(finished, timeout=timeout, what=f"study of {sop_uid} finished")[0]
    return bool(eligible), reason


# -- unparseable: 0xC000 ---------------------------------------------------------------------------
def test_unparseable_data_sets_answered_c000_and_quarantined(worker, tmp_path):
    ds = small_dx()
    whole = dataset_bytes(ds)
    cases = {
        # cut in the middle of an element's value, well before Pixel Data
        "truncated_header": whole[:37],
        "garbage": bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)),
        # parseable, but no Study Instance UID
        "no_study_uid": dataset_bytes(small_dx(StudyInstanceUID=None)),
    }
    rejected_before = len(list((worker.data_dir / "rejected").glob("*"))) if (worker.data_dir / "rejected").exists() else 0
    for name, body in cases.items():
        assert send(worker, raw_file(tmp_path / f"{name}.dcm", body)) == 0xC000, name
        assert worker.echo(), f"listener down after {name}"
    assert len(list((worker.data_dir / "rejected").iterdir())) == rejected_before + len(cases)
    assert worker.log().count("rejected instance (0xC000)") >= len(cases)


# -- cut short, then sent whole ---------------------------------------------------------------------
def _inside(body: bytes, value: str) -> int:
    return body.rindex(value.encode()) + len(value) // 2


def test_data_sets_cut_short_refused_and_the_complete_resend_scored_and_delivered(worker, destination, tmp_path):
    """A data set cut inside StudyInstanceUID, SOPInstanceUID, a sequence or Pixel Data: 0xC000, the file
    in rejected/, nothing recorded under any UID taken from the cut bytes; the complete file sent next
    (same UIDs) is stored, its study scored and its SR delivered."""
    cuts = {
        "StudyInstanceUID": lambda ds, body: _inside(body, ds.StudyInstanceUID),
        "SOPInstanceUID": lambda ds, body: _inside(body, ds.SOPInstanceUID),
        "sequence": lambda ds, body: _inside(body, "XR chest PA"),
        "PixelData": lambda ds, body: len(body) - 1000,
    }
    studies_before = {uid for (uid,) in worker.db_rows("select study_uid from studies")}
    sent = {}
    for name, cut_at in cuts.items():
        ds = small_dx()
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID2", "RADLEX", "XR chest PA"
        ds.ProcedureCodeSequence = [item]
        body = dataset_bytes(ds)
        cut = raw_file(tmp_path / f"cut_{name}.dcm", body[:cut_at(ds, body)], sop_instance=ds.SOPInstanceUID)
        assert send(worker, cut) == 0xC000, name
        assert worker.echo()
        studies_now = {uid for (uid,) in worker.db_rows("select study_uid from studies")}
        assert studies_now == studies_before, (name, studies_now - studies_before)   # nothing under a cut UID
        assert not worker.db_rows("select 1 from instances where sop_instance_uid=?", ds.SOPInstanceUID)
        whole = raw_file(tmp_path / f"whole_{name}.dcm", body, sop_instance=ds.SOPInstanceUID)
        assert send(worker, whole) == 0x0000, name
        studies_before.add(ds.StudyInstanceUID)
        sent[name] = ds
    assert worker.log().count("incomplete or malformed data set") >= len(cuts)
    for name, ds in sent.items():
        row = worker.wait_for(lambda: [r for r in worker.results() if r["study_uid"] == ds.StudyInstanceUID],
                              what=f"result after the cut {name}")[0]
        assert row["status"] == "done" and row["n_scored"] == 1, (name, row)
        worker.wait_for(lambda: [f for f in destination.files() if f.StudyInstanceUID == ds.StudyInstanceUID],
                        what=f"SR delivered after the cut {name}")
        (path, size), = worker.db_rows("select path, size from instances where sop_instance_uid=?",
                                       ds.SOPInstanceUID)
        assert os.path.getsize(path) == size


def test_same_instance_on_two_associations_at_once_one_row_one_intact_file(worker, tmp_path):
    ds = small_dx()
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    files, bodies = [], []
    for i in range(2):
        ds.PatientName = "X" * (2 * i + 2)              # two copies of different sizes
        bodies.append(dataset_bytes(ds))
        files.append(raw_file(tmp_path / f"copy{i}.dcm", bodies[-1], sop_instance=ds.SOPInstanceUID))
    barrier = threading.Barrier(len(files))
    statuses: list = []

    def go(path):
        barrier.wait()
        statuses.append(send(worker, path))

    threads = [threading.Thread(target=go, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [0, 0]
    rows = worker.db_rows("select path, size, transfer_syntax from instances where sop_instance_uid=?",
                          ds.SOPInstanceUID)
    assert len(rows) == 1
    path, size, syntax = rows[0]
    assert os.path.getsize(path) == size
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == syntax and stored.SOPInstanceUID == ds.SOPInstanceUID
    on_disk = Path(path).read_bytes()
    assert sum(on_disk.endswith(body) for body in bodies) == 1      # exactly one copy, whole


def test_unusable_instance_replaced_by_the_complete_resend_new_sr_revision(worker, destination, tmp_path):
    """Stored but unusable (Pixel Data shorter than Rows x Columns: a complete encoding whose pixels do
    not decode): the study ends no_eligible_images. The same instance resent with its real pixels
    replaces it; the study is scored again and its SR delivered. An identical resend is a duplicate."""
    good = small_dx()
    good.StudyInstanceUID, good.SOPInstanceUID = generate_uid(), generate_uid()
    short = small_dx(PixelData=b"\0" * 100)
    short.StudyInstanceUID, short.SOPInstanceUID = good.StudyInstanceUID, good.SOPInstanceUID
    short_file = raw_file(tmp_path / "short.dcm", dataset_bytes(short), sop_instance=good.SOPInstanceUID)
    assert send(worker, short_file) == 0x0000
    assert reason_of(worker, good.SOPInstanceUID) == (False, "truncated_pixel_data")
    assert send(worker, short_file) == 0x0000                         # identical: a duplicate, nothing changes
    whole = raw_file(tmp_path / "whole.dcm", dataset_bytes(good), sop_instance=good.SOPInstanceUID)
    assert send(worker, whole) == 0x0000
    row = worker.wait_for(lambda: [r for r in worker.results() if r["study_uid"] == good.StudyInstanceUID
                                   and r["status"] == "done"], what="re-scored after the replacement")[0]
    assert row["n_scored"] == 1 and row["revision"] == 2
    worker.wait_for(lambda: [f for f in destination.files() if f.StudyInstanceUID == good.StudyInstanceUID],
                    what="SR delivered after the replacement")
    (path, size, eligible), = worker.db_rows("select path, size, eligible from instances where sop_instance_uid=?",
                                             good.SOPInstanceUID)
    assert eligible and os.path.getsize(path) == size and Path(path).read_bytes().endswith(dataset_bytes(good))
    assert "replaced its stored copy" in worker.log()


# -- wrong SOP classes -----------------------------------------------------------------------------
def test_mr_and_ct_contexts_refused_at_negotiation(worker):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for sop_class in (MR, CT, Verification):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    try:
        assoc = ae.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER")
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
            assert accepted == {Verification} and rejected == {MR, CT}
            mr = make_dataset(synthetic_radiograph(32, 32, 12), sop_class=MR)
            with pytest.raises(ValueError):    # nothing to send it on: no status, by design
                assoc.send_c_store(mr)
            assert int(assoc.send_c_echo().Status) == 0
        finally:
            assoc.release()
    finally:
        ae.shutdown()
    assert worker.echo()


def test_defined_status_and_recorded_reason_for_each_broken_instance(worker, tmp_path):
    study_uid = generate_uid()
    rgb = make_rgb_dataset()
    frames = make_dataset(np.stack([synthetic_radiograph(64, 48, 12, seed=i) for i in range(3)]),
                          sop_class=MULTIFRAME_GRAYSCALE_WORD_SC)
    cases: dict[str, tuple[Dataset, str, bool, str | None]] = {   # name: (data set, context, eligible, reason)
        "mr_class_in_dx_context": (small_dx(SOPClassUID=MR), DX, False, "wrong_sop_class"),
        "no_sop_class": (small_dx(SOPClassUID=None), DX, True, None),
        "no_pixel_data": (small_dx(PixelData=None), DX, False, "no_pixel_data"),
        "rows_zero": (small_dx(Rows=0), DX, False, "bad_dimensions"),
        "rows_columns_65535": (small_dx(Rows=65535, Columns=65535), DX, False, "bad_dimensions"),
        "short_pixel_data": (small_dx(PixelData=b"\0" * 100), DX, False, "truncated_pixel_data"),
        "rgb": (rgb, "1.2.840.10008.5.1.4.1.1.7", False, "unsupported_photometric"),
        "multi_frame": (frames, MULTIFRAME_GRAYSCALE_WORD_SC, True, None),
    }
    sops = {}
    for name, (ds, context, _, _) in cases.items():
        ds.StudyInstanceUID = study_uid
        sops[name] = str(ds.SOPInstanceUID)
        body = dataset_bytes(ds)
        status = send(worker, raw_file(tmp_path / f"{name}.dcm", body, sop_class=context,
                                       sop_instance=sops[name]), context)
        assert status == 0x0000, (name, status)
        assert worker.echo(), f"listener down after {name}"
    for name, (_, _, eligible, reason) in cases.items():
        assert reason_of(worker, sops[name]) == (eligible, reason), name
    row = worker.wait_for(lambda: [r for r in worker.results() if r["study_uid"] == study_uid], what="result")[0]
    assert row["status"] == "done" and row["n_scored"] == 2           # no_sop_class + multi_frame
    assert sum(row["reasons"].values()) == len(cases) - 2
    status = worker.status()                                          # visible in `cxr-worker status`
    assert {"wrong_sop_class", "bad_dimensions", "truncated_pixel_data", "unsupported_photometric",
            "no_pixel_data"} <= set(status["skipped_instances"])


# -- 200 MB, streamed ------------------------------------------------------------------------------
def test_200_mb_data_set_streamed_stored_and_scored(worker, tmp_path):
    side = 10240                                        # 10240 x 10240 x 16 bit = 200 MiB of Pixel Data
    ds = small_dx(Rows=side, Columns=side, PixelData=None)
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    path = tmp_path / "big.dcm"
    raw_file(path, None, sop_instance=sop, dataset=ds)
    with open(path, "ab") as handle:                    # Pixel Data written in 8 MiB slabs
        length = side * side * 2
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        row = (np.linspace(0, 4095, side, dtype=np.uint16)).tobytes()
        slab = row * 400
        written = 0
        while written < length:
            chunk = slab[: length - written]
            handle.write(chunk)
            written += len(chunk)
    assert path.stat().st_size > 200 * 2**20
    started = time.monotonic()
    assert send(worker, path, timeout=120) == 0x0000
    elapsed = time.monotonic() - started
    assert elapsed < 120, elapsed
    spooled = worker.db_rows("select path, size from instances where sop_instance_uid=?", sop)
    # the same data set bytes; only the file meta is the receiver's own (a few bytes differ)
    assert spooled and abs(os.path.getsize(spooled[0][0]) - path.stat().st_size) < 256
    assert worker.echo()
    assert reason_of(worker, sop, timeout=120) == (True, None)
    os.unlink(path)


# -- patient names in five character sets ----------------------------------------------------------
NAMES = {
    "ISO_IR 100": "Müller^Jürgen",
    "ISO_IR 192": "山田^太郎",
    "ISO 2022 IR 87": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "ISO_IR 144": "Иванов^Иван",
    "ISO_IR 127": "قباني^لنزار",
}


def test_non_ascii_patient_names_decoded_and_not_logged(worker, kaggle_jpegs, tmp_path):
    sent = {}
    for i, (charset, name) in enumerate(NAMES.items()):
        study_uid = generate_uid()
        path = wrap_jpeg(kaggle_jpegs["NORMAL"][i], tmp_path / f"n{i}.dcm", study_uid=study_uid)
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ["", charset] if charset.startswith("ISO 2022") else charset
        ds.PatientName = name
        ds.PatientID = f"ID-{charset}"
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        assert name.encode("utf-8") not in raw or charset == "ISO_IR 192"  # really in that character set
        assert send(worker, path) == 0x0000, charset
        assert worker.echo()
        sent[study_uid] = (charset, name)
    for study_uid, (charset, name) in sent.items():
        row = worker.wait_for(lambda: [r for r in worker.results() if r["study_uid"] == study_uid],
                              what=f"result for {charset}")[0]
        assert row["status"] == "done", (charset, row)
        sr = pydicom.dcmread(row["sr_path"])
        assert str(sr.PatientName) == name, (charset, str(sr.PatientName))
    log = worker.log()
    for charset, name in NAMES.items():
        for part in name.replace("=", "^").split("^"):
            assert part not in log, (charset, part)
    for bad in ("UnicodeDecodeError", "UnicodeEncodeError", "Logging error", "Traceback"):
        assert bad not in log
