"""worker/receiver.py on real files, real SQLite and the real spool (no network: the listener's part is
tests/system/test_hostile_input.py): a data set cut short anywhere is refused before any row exists, an
unusable stored copy is replaced by a different complete resend, an identical resend is a duplicate, and
copies of one instance arriving together leave one row describing the one file in the spool."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from testkit.dicom_factory import make_dataset, synthetic_radiograph
from worker.errors import Unreadable
from worker.receiver import Received, Receiver
from worker.scoring.eligibility import BrokenEncoding, check_encoding, read_header
from worker.settings import load_settings
from worker.store.db import Database, Instance, Study, StudyState
from worker.store.spool import Spool
from worker.store.studies import claim_ready, conclude


@pytest.fixture()
def receiver(tmp_path):
    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path / "data"}"'})
    db = Database(settings.storage.url)
    yield Receiver(settings, db, Spool(settings.storage.data_dir))
    db.dispose()


def encoded(ds: Dataset) -> bytes:
    """The file as pynetdicom spools it: preamble, file meta, the data set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dx(study_uid: str | None = None, sop_uid: str | None = None, rows: int = 64, seed: int = 0) -> Dataset:
    ds = make_dataset(synthetic_radiograph(rows, 48, 12, seed=seed))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID2", "RADLEX", "XR chest PA"
    ds.ProcedureCodeSequence = DicomSequence([item])
    return ds


def incoming(receiver: Receiver, data: bytes) -> Path:
    path = receiver.spool.incoming / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    return path


def rows(receiver: Receiver, sop_uid: str):
    with receiver.db.session() as s:
        return s.query(Instance).filter_by(sop_instance_uid=sop_uid).all()


def studies(receiver: Receiver) -> list[str]:
    with receiver.db.session() as s:
        return [uid for (uid,) in s.query(Study.study_uid).all()]


def rejected(receiver: Receiver) -> list[Path]:
    folder = receiver.spool.root / "rejected"
    return sorted(folder.iterdir()) if folder.exists() else []


def _cut_inside_value(data: bytes, value: str) -> int:
    at = data.rindex(value.encode())
    return at + len(value) // 2


CUTS = {  # where the data set ends: a position inside it
    "StudyInstanceUID": lambda ds, data: _cut_inside_value(data, ds.StudyInstanceUID),
    "SOPInstanceUID": lambda ds, data: _cut_inside_value(data, ds.SOPInstanceUID),
    "sequence": lambda ds, data: _cut_inside_value(data, "XR chest PA"),
    "PixelData": lambda ds, data: len(data) - 1000,
}


@pytest.mark.parametrize("where", list(CUTS))
def test_data_set_cut_short_is_refused_then_the_complete_resend_is_stored(receiver, where):
    ds = dx()
    data = encoded(ds)
    cut = data[:CUTS[where](ds, data)]
    with pytest.raises(BrokenEncoding):
        check_encoding(incoming(receiver, cut))
    tmp = incoming(receiver, cut)
    with pytest.raises(Unreadable) as refused:
        receiver.store(tmp, "MODALITY")
    assert "incomplete or malformed data set" in str(refused.value)
    assert not tmp.exists() and len(rejected(receiver)) == 1 and rejected(receiver)[0].read_bytes() == cut
    assert studies(receiver) == [] and not list(receiver.spool.spool.rglob("*.dcm"))  # nothing under any UID
    assert receiver.store(incoming(receiver, data), "MODALITY") is Received.STORED
    (row,) = rows(receiver, ds.SOPInstanceUID)
    assert row.study_uid == ds.StudyInstanceUID and row.eligible
    assert Path(row.path).read_bytes()[-1000:] == data[-1000:] and Path(row.path).stat().st_size == row.size


def test_cut_uid_is_refused_even_where_the_bytes_still_parse(receiver):
    """A UID that is not a valid UID (what a cut-off value looks like) is refused, never recorded."""
    ds = dx()
    ds.StudyInstanceUID = "1.2.826.0."
    tmp = incoming(receiver, encoded(ds))
    with pytest.raises(Unreadable, match="StudyInstanceUID"):
        receiver.store(tmp, "MODALITY")
    assert studies(receiver) == []


def test_every_element_whole_for_each_transfer_syntax(tmp_path):
    """The walk accepts complete files in implicit, explicit big endian and deflated syntaxes too, and
    refuses each cut short."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        ds = dx()
        ds.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / "f.dcm"
        ds.save_as(path, enforce_file_format=True, little_endian=syntax != ExplicitVRBigEndian,
                   implicit_vr=syntax == ImplicitVRLittleEndian)
        assert check_encoding(path).transfer_syntax == syntax
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 7])
        with pytest.raises(BrokenEncoding):
            check_encoding(path)


def _as_decoded_unusable(receiver: Receiver, sop_uid: str, study_uid: str) -> None:
    """What the scorer records for an instance whose pixels did not decode (and its study, scored)."""
    with receiver.db.write() as conn:
        conn.execute(Instance.__table__.update().where(Instance.sop_instance_uid == sop_uid)
                     .values(eligible=False, reason="truncated_pixel_data", detail="short"))
        conn.execute(Study.__table__.update().where(Study.study_uid == study_uid)
                     .values(status=StudyState.NO_ELIGIBLE, revision=1))


def test_unusable_copy_replaced_by_a_different_resend_identical_resend_is_a_duplicate(receiver):
    good = dx(rows=64)
    short = dx(good.StudyInstanceUID, good.SOPInstanceUID, rows=64)
    short.PixelData = b"\0" * 100                       # complete encoding, pixels shorter than declared
    assert receiver.store(incoming(receiver, encoded(short)), "MODALITY") is Received.STORED
    _as_decoded_unusable(receiver, good.SOPInstanceUID, good.StudyInstanceUID)
    # the identical bytes again: a duplicate, the row untouched
    assert receiver.store(incoming(receiver, encoded(short)), "MODALITY") is Received.DUPLICATE
    assert rows(receiver, good.SOPInstanceUID)[0].reason == "truncated_pixel_data"
    # the complete image: it replaces the unusable copy; the study is evaluated again
    data = encoded(good)
    assert receiver.store(incoming(receiver, data), "MODALITY") is Received.REPLACED
    (row,) = rows(receiver, good.SOPInstanceUID)
    assert row.eligible and row.reason is None and row.size == len(data) == Path(row.path).stat().st_size
    assert Path(row.path).read_bytes() == data and row.transfer_syntax == str(good.file_meta.TransferSyntaxUID)
    with receiver.db.session() as s:
        study = s.query(Study).filter_by(study_uid=good.StudyInstanceUID).one()
    assert study.status == StudyState.RECEIVING and study.n_instances == 1 and study.revision == 1
    # now usable: a different copy is not taken, the first one stays
    other = dx(good.StudyInstanceUID, good.SOPInstanceUID, rows=64, seed=5)
    assert receiver.store(incoming(receiver, encoded(other)), "MODALITY") is Received.DUPLICATE
    assert Path(row.path).read_bytes() == data
    assert not list(receiver.spool.incoming.iterdir())   # nothing left behind


def test_replacement_while_scoring_sends_the_study_back_to_receiving(receiver):
    good = dx()
    short = dx(good.StudyInstanceUID, good.SOPInstanceUID)
    short.PixelData = b"\0" * 100
    second = dx(good.StudyInstanceUID)
    for ds in (short, second):
        receiver.store(incoming(receiver, encoded(ds)), "MODALITY")
    _as_decoded_unusable(receiver, good.SOPInstanceUID, good.StudyInstanceUID)
    with receiver.db.write() as conn:
        conn.execute(Study.__table__.update().values(status=StudyState.READY))
    (claim,) = claim_ready(receiver.db, "host:1:me", 10, 60)
    assert receiver.store(incoming(receiver, encoded(good)), "MODALITY") is Received.REPLACED
    with receiver.db.write() as conn:
        assert conclude(conn, "host:1:me", claim, StudyState.DONE, 1, None, time.time()) == StudyState.RECEIVING


@pytest.mark.parametrize("first", ["linked", "found"])
def test_a_file_without_a_row_belongs_to_whichever_copy_commits_first(receiver, first):
    """The race of two associations, step by step. Copy A is linked into the spool, its row not yet
    committed, when copy B (other bytes, another size) finds the file taken and no row. Either A commits
    before B does (``linked``: B must not have replaced A's file) or B commits first (``found``: the
    file must be B's, and A's commit is the duplicate)."""
    a = dx()
    b = dx(a.StudyInstanceUID, a.SOPInstanceUID, seed=3)
    b.PatientName = "Longer^Name^Than^A"
    data_a, data_b = encoded(a), encoded(b)
    assert len(data_a) != len(data_b)
    final = receiver.spool.instance_path(a.StudyInstanceUID, a.SOPInstanceUID)
    parsed = incoming(receiver, data_a)
    header_a = read_header(parsed)
    parsed.unlink()
    assert receiver.spool.adopt(incoming(receiver, data_a), final)     # A: linked, no row yet
    if first == "linked":
        looked_up = receiver._stored

        def a_commits_meanwhile(sop_uid):   # B has found the file and no row; now A commits
            found = looked_up(sop_uid)
            assert found is None
            assert receiver._record(header_a, final, len(data_a), "MODALITY") is Received.STORED
            return found

        receiver._stored = a_commits_meanwhile
        assert receiver.store(incoming(receiver, data_b), "MODALITY") is Received.DUPLICATE
        winner = data_a
    else:
        assert receiver.store(incoming(receiver, data_b), "MODALITY") is Received.STORED
        assert receiver._record(header_a, final, len(data_a), "MODALITY") is Received.DUPLICATE
        winner = data_b
    (row,) = rows(receiver, a.SOPInstanceUID)
    assert final.read_bytes() == winner and row.size == len(winner) == final.stat().st_size
    assert not list(receiver.spool.incoming.iterdir())


def test_copies_arriving_at_the_same_moment_leave_one_row_and_its_file(receiver):
    first = dx()
    copies = []
    for i in range(4):
        ds = dx(first.StudyInstanceUID, first.SOPInstanceUID, seed=i)
        ds.PatientName = "X" * (2 * i + 2)               # a different size each
        copies.append(encoded(ds))
    paths = [incoming(receiver, data) for data in copies]
    barrier = threading.Barrier(len(paths))
    outcomes: list = []

    def send(path):
        barrier.wait()
        try:
            outcomes.append(receiver.store(path, "MODALITY"))
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=send, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, outcomes)) == sorted(["stored"] + ["duplicate"] * 3), outcomes
    (row,) = rows(receiver, first.SOPInstanceUID)
    on_disk = Path(row.path).read_bytes()
    assert on_disk in copies and row.size == len(on_disk)
    check_encoding(row.path)                             # intact
    assert pydicom.dcmread(row.path).file_meta.TransferSyntaxUID == row.transfer_syntax
    assert not list(receiver.spool.incoming.iterdir())
