"""C-STORE/C-ECHO over real loopback associations: DCMTK storescp and a real Orthanc."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from testkit.dicom_factory import make_dataset
from testkit.env import REPO_ROOT, dcmtk
from testkit.orthanc import OrthancServer, free_port
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom.dsutils import encode

from worker.cli import scu as cli_scu
from worker.net import install
from worker.net.associations import AssociationPool
from worker.net.scu import StoreOutcome, echo, store_files
from worker.cli.wrap import wrap_image_as_dicom

STORESCP_AET = "STORESCP"


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def storescp(outdir: Path, *options: str) -> Iterator[int]:
    """DCMTK storescp on a free port writing to outdir; always terminated."""
    binary = dcmtk("storescp")
    port = free_port()
    outdir.mkdir(parents=True, exist_ok=True)
    log = open(outdir.parent / f"storescp-{port}.log", "wb")
    process = subprocess.Popen(
        [binary, "-aet", STORESCP_AET, "-od", str(outdir), "-fe", ".dcm", *options, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def received(outdir: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in sorted(outdir.glob("*.dcm")))}


@pytest.fixture(scope="module")
def dicom_files(kaggle_jpegs: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three wrapped Kaggle films (one study each) on disk."""
    out = tmp_path_factory.mktemp("dx")
    paths = []
    for index, jpeg in enumerate([*kaggle_jpegs["NORMAL"][:1], *kaggle_jpegs["PNEUMONIA"][:2]]):
        path = out / f"{index}.dcm"
        wrap_image_as_dicom(jpeg).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def rle_file(dicom_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = pydicom.dcmread(dicom_files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.compress(RLELossless)
    path = tmp_path_factory.mktemp("rle") / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta: the bytes a C-STORE carries."""
    data = path.read_bytes()
    assert data[128:136] == b"DICM\x02\x00\x00\x00", path  # preamble, then (0002,0000)
    (meta_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + meta_length:]


@pytest.fixture
def group_length_file(tmp_path: Path) -> Path:
    """A small DX file whose data set starts with a (0008,0000) group length, as older modalities
    write: pydicom drops retired group lengths when it encodes, so they arrive only as stored."""
    ds = make_dataset(np.arange(32 * 24, dtype=np.uint16).reshape(32, 24) % 4096, bits_stored=12)
    path = tmp_path / "group_length.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    start = len(data) - len(data_set_bytes(path))
    group = len(encode(ds.group_dataset(0x0008), False, True))
    element = struct.pack("<HH2sHI", 0x0008, 0x0000, b"UL", 4, group)
    path.write_bytes(data[:start] + element + data[start:])
    assert pydicom.dcmread(path)[0x00080000].value == group
    return path


@pytest.mark.parametrize("link", ["one association", "kept association (outbox)"])
def test_files_are_sent_as_stored_byte_for_byte(group_length_file, tmp_path, link):
    install()  # the service and `cxr-worker send` do
    pool = AssociationPool(60.0) if link != "one association" else None
    outdir = tmp_path / "in"
    try:
        with storescp(outdir, "+B") as port:  # storescp --bit-preserving: writes the data set as received
            [outcome] = store_files([group_length_file], "127.0.0.1", port, STORESCP_AET, pool=pool)
            assert outcome.ok, outcome
    finally:
        if pool is not None:
            pool.close()
    [got] = outdir.glob("*.dcm")
    assert data_set_bytes(got) == data_set_bytes(group_length_file)


def test_a_file_the_peer_takes_only_in_another_syntax_is_converted(group_length_file, tmp_path):
    install()
    original = pydicom.dcmread(group_length_file)
    assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with storescp(tmp_path / "in", "+xi") as port:  # accepts Implicit VR Little Endian only
        [outcome] = store_files([group_length_file], "127.0.0.1", port, STORESCP_AET)
    assert outcome.ok, outcome
    got = received(tmp_path / "in")[original.SOPInstanceUID]
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PixelData == original.PixelData


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with OrthancServer(aet="ORTHANC") as server:
        yield server


def test_store_to_storescp_pixel_identical(dicom_files, tmp_path):
    outdir = tmp_path / "in"
    with storescp(outdir, "+xa") as port:
        outcomes = store_files(dicom_files, "127.0.0.1", port, STORESCP_AET)
    assert [o.ok for o in outcomes] == [True] * len(dicom_files), outcomes
    assert all(o.status == 0 and o.error is None for o in outcomes)
    got = received(outdir)
    for path, outcome in zip(dicom_files, outcomes):
        sent = pydicom.dcmread(path)
        assert outcome.sop_instance_uid == sent.SOPInstanceUID
        assert got[sent.SOPInstanceUID].PixelData == sent.PixelData


def test_compressed_file_is_sent_as_stored_or_decompressed_if_refused(rle_file, tmp_path):
    original = pydicom.dcmread(rle_file)
    with storescp(tmp_path / "all", "+xa") as port:  # accepts RLE: no re-encoding
        [outcome] = store_files([rle_file], "127.0.0.1", port, STORESCP_AET)
    assert outcome.ok, outcome
    got = received(tmp_path / "all")[original.SOPInstanceUID]
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert got.PixelData == original.PixelData  # the RLE fragments, byte for byte
    with storescp(tmp_path / "plain") as port:  # default storescp: uncompressed only
        [outcome] = store_files([rle_file], "127.0.0.1", port, STORESCP_AET)
    assert outcome.ok, outcome
    got = received(tmp_path / "plain")[original.SOPInstanceUID]
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == original.pixel_array).all()


def test_echo_storescp_and_orthanc(orthanc, tmp_path):
    with storescp(tmp_path / "in") as port:
        assert echo("127.0.0.1", port, STORESCP_AET) == 0
    assert echo(orthanc.host, orthanc.dicom_port, orthanc.aet) == 0


def test_store_to_orthanc(orthanc, dicom_files):
    outcomes = store_files(dicom_files, orthanc.host, orthanc.dicom_port, orthanc.aet, progress=True)
    assert all(o.ok for o in outcomes), outcomes
    for path in dicom_files:
        sent = pydicom.dcmread(path)
        [instance] = orthanc.study_instances(sent.StudyInstanceUID)
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(instance["ID"])))
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        assert stored.PixelData == sent.PixelData


def test_closed_port_gives_outcomes_not_exceptions(dicom_files):
    port = free_port()  # nothing listens there
    outcomes = store_files(dicom_files[:2], "127.0.0.1", port, "NOBODY", timeout=5)
    assert [o.status for o in outcomes] == [None, None]
    assert all(not o.ok and "cannot connect" in o.error for o in outcomes)
    assert echo("127.0.0.1", port, "NOBODY", timeout=5) is None


def test_rejected_association_gives_outcomes_not_exceptions(dicom_files, tmp_path):
    with storescp(tmp_path / "in", "--refuse") as port:
        outcomes = store_files(dicom_files[:2], "127.0.0.1", port, STORESCP_AET, timeout=5)
        assert echo("127.0.0.1", port, STORESCP_AET, timeout=5) is None
    assert [o.status for o in outcomes] == [None, None]
    # storescp --refuse closes the socket right after its A-ASSOCIATE-RJ; pynetdicom sometimes sees
    # the close first. Either way each file gets a clear reason, never an exception.
    assert all(not o.ok and ("rejected" in o.error or "aborted" in o.error) for o in outcomes), outcomes


def test_unreadable_file_is_reported_and_the_rest_sent(dicom_files, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_text("not dicom")
    with storescp(tmp_path / "in", "+xa") as port:
        outcomes = store_files([junk, dicom_files[0]], "127.0.0.1", port, STORESCP_AET)
    assert outcomes[0] == StoreOutcome(junk, None, None, outcomes[0].error)
    assert "not a readable DICOM file" in outcomes[0].error
    assert outcomes[1].ok


def test_orthanc_harness_pushes_and_survives_restart(dicom_files, tmp_path):
    """The harness the worker tests rely on: push to a modality, stop, start on the same ports."""
    with storescp(tmp_path / "sink", "+xa") as sink_port:
        with OrthancServer(aet="PACS", modalities={"sink": [STORESCP_AET, "127.0.0.1", sink_port]}) as pacs:
            instance = pacs.upload(dicom_files[0])
            assert pacs.instances() == [instance]
            assert pacs.instance_tags(instance)["SOPInstanceUID"] == pydicom.dcmread(dicom_files[0]).SOPInstanceUID
            pacs.store_to_modality("sink", [instance])
            ports = (pacs.dicom_port, pacs.http_port)
            pacs.stop()
            assert echo("127.0.0.1", ports[0], "PACS", timeout=3) is None
            pacs.start()
            assert (pacs.dicom_port, pacs.http_port) == ports and pacs.instances() == [instance]
    assert list(received(tmp_path / "sink")) == [pydicom.dcmread(dicom_files[0]).SOPInstanceUID]


def _kaggle_dir(kaggle_jpegs: dict[str, list[Path]], tmp_path: Path) -> Path:
    source = tmp_path / "films" / "nested"
    source.mkdir(parents=True)
    for jpeg in kaggle_jpegs["PNEUMONIA"][:2]:
        shutil.copy(jpeg, source / jpeg.name)
    (source / "broken.jpeg").write_bytes(b"\xff\xd8 truncated")
    return tmp_path / "films"


def test_cli_send_wraps_and_reports(kaggle_jpegs, tmp_path, capsys):
    films = _kaggle_dir(kaggle_jpegs, tmp_path)
    with storescp(tmp_path / "in", "+xa") as port:
        args = ["send", str(films), "--recursive", "--wrap", "--port", str(port), "--aec", STORESCP_AET, "--no-progress"]
        code = cli_scu.main(args)
        assert cli_scu.main(["echo", "--port", str(port), "--aec", STORESCP_AET]) == 0
    out, err = capsys.readouterr()
    assert code == 1
    assert "sent 2, failed 1" in out
    assert "broken.jpeg" in err and "cannot wrap" in err
    got = received(tmp_path / "in")
    assert len(got) == 2 and {ds.PatientID for ds in got.values()} <= {p.name.split("_")[0] for p in kaggle_jpegs["PNEUMONIA"]}
    assert cli_scu.main(["echo", "--port", str(free_port()), "--timeout", "3"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_cli_send_as_a_process(dicom_files, tmp_path):
    """Through the installed console script (pip install -e), else `python -m worker`."""
    script = shutil.which("cxr-worker")
    command = [script] if script else [sys.executable, "-m", "worker"]
    with storescp(tmp_path / "in", "+xa") as port:
        run = subprocess.run(
            [*command, "send", *map(str, dicom_files), "--port", str(port), "--aec", STORESCP_AET],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )
    assert run.returncode == 0, run.stderr
    assert f"sent {len(dicom_files)}, failed 0" in run.stdout
    assert len(received(tmp_path / "in")) == len(dicom_files)
