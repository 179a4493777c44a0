"""Security of `cxr-worker serve`, proven with real peers.

- Calling AE allow-list and called AE check: DCMTK echoscu/storescu and pynetdicom see an
  A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 0x03 / 0x07); an allowed AE works.
- DICOM TLS: DCMTK echoscu/storescu `+tls`, pynetdicom and `cxr-worker echo/send --tls` against a
  TLS listener; plaintext and certificate-less clients refused when a client certificate is
  required; the SR reaches a DCMTK storescp `+tls` destination that requires our client certificate.
- Files and the database readable by the service user only; no patient data in the INFO log, also
  on the warning/error paths.

Certificates are generated per run (a throwaway CA, a server certificate for 127.0.0.1/localhost,
client certificates from that CA and from a rogue CA) with the `cryptography` package.
"""

from __future__ import annotations

import datetime

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.env import REPO_ROOT, dcmtk, free_port
from testkit.pki import make_pki
from testkit.worker_process import StoreSCP, WorkerProcess, storescu, wrap_jpeg

pytestmark = pytest.mark.dcmtk

ALLOWED_AET = "MODALITY1"


# --- a throwaway PKI --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: dict[str, Path], *, require_client_certificate: bool) -> dict[str, str]:
    return {
        "CXR_WORKER__TLS__ENABLED": "true",
        "CXR_WORKER__TLS__CERTIFICATE": str(pki["server.crt"]),
        "CXR_WORKER__TLS__PRIVATE_KEY": str(pki["server.key"]),
        "CXR_WORKER__TLS__CA_CERTIFICATES": str(pki["ca.crt"]),
        "CXR_WORKER__TLS__REQUIRE_CLIENT_CERTIFICATE": "true" if require_client_certificate else "false",
    }


def client_tls(pki: dict[str, Path], cert: str | None = "client"):
    from worker.net.tls import client_context

    if cert is None:
        return client_context(str(pki["ca.crt"]))
    return client_context(str(pki["ca.crt"]), str(pki[f"{cert}.crt"]), str(pki[f"{cert}.key"]))


def dcmtk_tls(pki: dict[str, Path], cert: str | None = "client") -> tuple[str, ...]:
    """DCMTK TLS options: `+tls key cert` (or `+tla`: no certificate), trusting our CA with `+cf`."""
    if cert is None:
        return ("+tla", "+cf", str(pki["ca.crt"]))
    return ("+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"]), "+cf", str(pki["ca.crt"]))


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *options: str, aet: str = "TEST_SCU", aec: str = "CXR_WORKER") -> subprocess.CompletedProcess:
    return run([dcmtk("echoscu"), "-aet", aet, "-aec", aec, *options, "127.0.0.1", str(port)])



def wait_result(worker: WorkerProcess, study_uid: str, delivered: int = 0) -> dict:
    def ready():
        rows = [r for r in worker.results() if r["study_uid"] == study_uid]
        return rows[0] if rows and rows[0]["delivered"] >= delivered else None
    return worker.wait_for(ready, what=f"result for {study_uid}")


# --- plain worker: AE checks, file modes, PHI ----------------------------------------------------

@pytest.fixture(scope="module")
def worker(tmp_path_factory, destination):
    env = {"CXR_WORKER__NETWORK__ALLOWED_CALLING_AETS": f'["TEST_SCU", "{ALLOWED_AET}"]'}
    with WorkerProcess(tmp_path_factory.mktemp("plain") / "data", destinations=[destination.destination()],
                       env=env) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def test_unknown_calling_aet_rejected_by_dcmtk_peer(worker, kaggle_jpegs, tmp_path):
    rejected = echoscu(worker.port, aet="INTRUDER")
    out = rejected.stdout + rejected.stderr
    assert rejected.returncode != 0
    assert "Association Rejected" in out and "Rejected Permanent" in out, out
    assert "Calling AE Title Not Recognized" in out, out
    wrong_called = echoscu(worker.port, aet=ALLOWED_AET, aec="NOT_THE_WORKER")
    out = wrong_called.stdout + wrong_called.stderr
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in out, out

    # storescu from an unknown AE stores nothing; from an allowed one it stores.
    study_uid = generate_uid()
    dcm = wrap_jpeg(kaggle_jpegs["NORMAL"][0], tmp_path / "a.dcm", study_uid=study_uid)
    refused = run([dcmtk("storescu"), "-aet", "INTRUDER", "-aec", "CXR_WORKER", "127.0.0.1", str(worker.port),
                   str(dcm)])
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(worker.port, aet=ALLOWED_AET).returncode == 0
    sent = run([dcmtk("storescu"), "-aet", ALLOWED_AET, "-aec", "CXR_WORKER", "127.0.0.1", str(worker.port),
                str(dcm)])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert worker.db_rows("select calling_aet from instances where study_uid=?", study_uid) == [(ALLOWED_AET,)]

    # One WARNING per rejection with the calling AE and the peer's address.
    log = worker.wait_for(lambda: worker.log() if "'NOT_THE_WORKER'" in worker.log() else None,
                          what="rejection logged")
    lines = [line for line in log.splitlines() if "rejected" in line and "INTRUDER" in line]
    assert lines and all(" WARNING " in line and "127.0.0.1" in line for line in lines), log[-2000:]
    assert any("Calling AE title not recognised" in line for line in lines)
    assert any("Called AE title not recognised" in line and "NOT_THE_WORKER" in line for line in log.splitlines())


def test_unknown_calling_aet_rejected_pynetdicom(worker):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    def associate(calling: str, called: str):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", worker.port, ae_title=called)
        return ae, assoc

    ae, assoc = associate("INTRUDER", "CXR_WORKER")
    try:
        assert assoc.is_rejected and not assoc.is_established
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        assert (rj.result_str, rj.source_str, rj.reason_str) == (
            "Rejected Permanent", "Service User", "Calling AE title not recognised")
    finally:
        ae.shutdown()
    ae, assoc = associate(ALLOWED_AET, "SOMEONE_ELSE")
    try:
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
        assert rj.reason_str == "Called AE title not recognised"
    finally:
        ae.shutdown()
    ae, assoc = associate(ALLOWED_AET, "CXR_WORKER")
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        ae.shutdown()


PHI_NAME = "Müller^Zoë"
PHI_ID = "PID-Ø-730518"
#: A child's birth date (3 years ago): inside the shipped model's intended use, so the study is scored.
_BORN = datetime.date.today() - datetime.timedelta(days=3 * 365)
PHI_BIRTH = _BORN.strftime("%Y%m%d")
#: The patient data and renderings a log could carry (str, repr/ascii escapes, transliterations,
#: UTF-8 read as Latin-1, other date formats).
PHI_FORMS = (PHI_NAME, "Müller", "Muller", "Mueller", "MÃ¼ller", "M\\xfcller", "M\\u00fcller",
             "M\\xc3\\xbcller", "Zoë", "Zoe^", "^Zoe", "Zo\\xeb", PHI_ID, "730518", PHI_BIRTH,
             _BORN.strftime("%Y-%m-%d"), _BORN.strftime("%d.%m.%Y"), _BORN.strftime("%m/%d/%Y"), "05.04.1923")


def test_no_patient_data_in_info_log_also_for_bad_instances(worker, kaggle_jpegs, tmp_path):
    """Non-ASCII patient data through the happy path and the warning/error paths: stored and scored,
    a pixel-data error, lateral/not-chest, an unparseable header (0xC000), an invalid birth-date
    format (pydicom's validation warning would print the value), an over-long patient ID."""
    phi = dict(patient_name=PHI_NAME, patient_id=PHI_ID, PatientBirthDate=PHI_BIRTH, AccessionNumber="ACC-SEC-1")
    good_uid, bad_uid, odd_uid = generate_uid(), generate_uid(), generate_uid()
    good = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][0], tmp_path / "good.dcm", study_uid=good_uid, **phi)

    broken = wrap_jpeg(kaggle_jpegs["NORMAL"][1], tmp_path / "broken.dcm", study_uid=bad_uid, **phi)
    ds = pydicom.dcmread(broken)
    ds.PixelData = b"\x00\x01" * 7
    ds.save_as(broken)
    lateral = wrap_jpeg(kaggle_jpegs["NORMAL"][1], tmp_path / "lat.dcm", study_uid=bad_uid, ViewPosition="LL", **phi)
    knee = wrap_jpeg(kaggle_jpegs["NORMAL"][1], tmp_path / "knee.dcm", study_uid=bad_uid, BodyPartExamined="KNEE",
                     **phi)

    # Odd values in the patient module of a study that is otherwise scorable (the SR copies them).
    odd = wrap_jpeg(kaggle_jpegs["NORMAL"][2], tmp_path / "odd.dcm", study_uid=odd_uid,
                    **{**phi, "PatientBirthDate": "05.04.1923"})
    ds = pydicom.dcmread(odd)
    ds.PatientID = (PHI_ID + "-") * 8  # > 64 characters for LO
    ds.save_as(odd)

    # A header that cannot be parsed, with the patient data readable before the damage.
    unparseable = tmp_path / "unparseable.dcm"
    raw = good.read_bytes()
    cut = raw.find(b"\x10\x00\x20\x00")  # (0010,0020) PatientID
    assert cut > 0
    unparseable.write_bytes(raw[:cut + 40] + b"\xff\xff\xff\xff" + b"\x00" * 64)

    sent = storescu(worker.port, good, broken, lateral, knee, odd)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # DCMTK will not send a file it cannot parse; pynetdicom sends a file's data set bytes as they are.
    assert _send_raw(worker.port, unparseable) == 0xC000
    assert wait_result(worker, good_uid)["status"] == "done"
    assert wait_result(worker, bad_uid)["status"] == "no_eligible_images"
    # A non-conformant birth date no longer costs the study its SR (it is left empty in the SR).
    assert wait_result(worker, odd_uid, delivered=1)["status"] == "done"
    worker.wait_for(lambda: "rejected instance" in worker.log(), what="unparseable instance rejected")
    time.sleep(0.5)
    log = worker.log()
    for uid in (good_uid, bad_uid, odd_uid):
        assert uid in log
    leaked = [form for form in PHI_FORMS if form in log]
    assert not leaked, f"patient data in the INFO log: {leaked}\n{log[-4000:]}"


def _send_raw(port: int, path: Path) -> int | None:
    """C-STORE a file's encoded data set as is (pynetdicom reads only its file meta)."""
    from pynetdicom import AE, _config

    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        ae.shutdown()


# --- file modes ----------------------------------------------------------------------------------

def test_files_and_database_private_to_service_user(worker, destination, kaggle_jpegs, tmp_path):
    study_uid = generate_uid()
    dcm = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][3], tmp_path / "m.dcm", study_uid=study_uid)
    assert storescu(worker.port, dcm).returncode == 0
    row = wait_result(worker, study_uid, delivered=1)
    data = worker.data_dir
    db = data / "worker.db"
    for suffix in ("", "-wal", "-shm"):  # the worker is running: WAL and shared memory exist
        assert Path(f"{db}{suffix}").exists(), f"{db}{suffix} missing"
    assert list((data / "spool").rglob("*.dcm")) and list((data / "sr").rglob(f"{row['sr_sop_instance_uid']}*"))
    checked = 0
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is mode {mode:o}: group/other bits set"
        assert mode & 0o700 == (0o700 if path.is_dir() else 0o600), f"{path} is mode {mode:o}"
        checked += 1
    assert checked >= 10


# --- DICOM TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_destination(tmp_path_factory, pki):
    """DCMTK storescp with TLS that requires a client certificate from our CA (its default -rc)."""
    options = ("+tls", str(pki["server.key"]), str(pki["server.crt"]), "+cf", str(pki["ca.crt"]))
    with StoreSCP(tmp_path_factory.mktemp("tlsdest") / "in", ae_title="TLSDEST", options=options) as scp:
        yield scp


@pytest.fixture(scope="module")
def tls_worker(tmp_path_factory, pki, tls_destination):
    dest = {**tls_destination.destination("secure-pacs"), "tls": True,
            "tls_ca_certificates": str(pki["ca.crt"]), "tls_certificate": str(pki["client.crt"]),
            "tls_private_key": str(pki["client.key"])}
    with WorkerProcess(tmp_path_factory.mktemp("tls") / "data", destinations=[dest],
                       env=tls_env(pki, require_client_certificate=True), tls=client_tls(pki)) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def test_tls_dcmtk_echoscu_storescu_scored_sr_delivered_over_tls(tls_worker, tls_destination, pki, kaggle_jpegs,
                                                                 tmp_path):
    echo = echoscu(tls_worker.port, *dcmtk_tls(pki))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    study_uid = generate_uid()
    files = [wrap_jpeg(j, tmp_path / f"{i}.dcm", study_uid=study_uid) for i, j in enumerate(kaggle_jpegs["PNEUMONIA"][:2])]
    sent = storescu(tls_worker.port, *files, options=dcmtk_tls(pki))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    row = wait_result(tls_worker, study_uid, delivered=1)
    assert row["status"] == "done" and row["n_scored"] == 2
    # The SR went to a destination that only speaks TLS and insists on our client certificate.
    srs = [ds for ds in tls_destination.files() if ds.StudyInstanceUID == study_uid]
    assert len(srs) == 1 and srs[0].SOPInstanceUID == row["sr_sop_instance_uid"]
    assert "DICOM TLS, client certificate required" in tls_worker.log()


def test_tls_plaintext_and_certificateless_clients_refused(tls_worker, pki):
    from worker.net.scu import echo_detail

    # DCMTK without +tls: the TLS listener never sees an A-ASSOCIATE-RQ.
    plain = echoscu(tls_worker.port)
    assert plain.returncode != 0
    assert "Association Request Failed" in plain.stdout + plain.stderr
    # pynetdicom plaintext: no association.
    status, reason = echo_detail("127.0.0.1", tls_worker.port, "CXR_WORKER", "TEST_SCU", timeout=5)
    assert status is None and reason
    # TLS but no client certificate (DCMTK anonymous TLS, pynetdicom without a certificate): refused.
    anonymous = echoscu(tls_worker.port, *dcmtk_tls(pki, None))
    assert anonymous.returncode != 0, anonymous.stdout + anonymous.stderr
    status, reason = echo_detail("127.0.0.1", tls_worker.port, "CXR_WORKER", "TEST_SCU",
                                 tls=client_tls(pki, None), timeout=5)
    assert status is None, reason
    # A certificate from another CA: refused; one from our CA: accepted.
    rogue = echoscu(tls_worker.port, *dcmtk_tls(pki, "rogue-client"))
    assert rogue.returncode != 0
    status, _ = echo_detail("127.0.0.1", tls_worker.port, "CXR_WORKER", "TEST_SCU",
                            tls=client_tls(pki, "rogue-client"), timeout=5)
    assert status is None
    status, reason = echo_detail("127.0.0.1", tls_worker.port, "CXR_WORKER", "TEST_SCU", tls=client_tls(pki),
                                 timeout=5)
    assert status == 0, reason
    log = tls_worker.wait_for(lambda: tls_worker.log() if tls_worker.log().count("TLS handshake with") >= 4 else None,
                              what="failed handshakes logged")
    assert all(" WARNING " in line for line in log.splitlines() if "TLS handshake with" in line)


def test_tls_silent_peer_does_not_block_other_connections(tls_worker, pki):
    """The TLS handshake runs on the association thread: a peer that connects and sends nothing
    must not stall the accept loop for everyone else."""
    from worker.net.scu import echo_detail

    with socket.create_connection(("127.0.0.1", tls_worker.port)) as silent:
        start = time.monotonic()
        status, reason = echo_detail("127.0.0.1", tls_worker.port, "CXR_WORKER", "TEST_SCU", tls=client_tls(pki),
                                     timeout=10)
        assert status == 0, reason
        assert time.monotonic() - start < 5


def test_cli_echo_and_send_with_tls_options(tls_worker, pki, kaggle_jpegs):
    common = ["--port", str(tls_worker.port), "--aet", "TEST_SCU", "--timeout", "10"]
    ok = tls_worker.cli("echo", *common, "--tls-ca", str(pki["ca.crt"]), "--tls-cert", str(pki["client.crt"]),
                        "--tls-key", str(pki["client.key"]))
    assert ok.returncode == 0 and "status 0x0000" in ok.stdout, ok.stdout + ok.stderr
    no_cert = tls_worker.cli("echo", *common, "--tls", "--tls-ca", str(pki["ca.crt"]))
    assert no_cert.returncode == 1, no_cert.stdout + no_cert.stderr
    plain = tls_worker.cli("echo", *common)
    assert plain.returncode == 1
    missing = tls_worker.cli("echo", *common, "--tls-ca", "/nonexistent/ca.crt")
    assert missing.returncode == 2 and "--tls-ca" in missing.stderr, missing.stderr
    sent = tls_worker.cli("send", "--wrap", "--no-progress", *common, "--tls-ca", str(pki["ca.crt"]),
                          "--tls-cert", str(pki["client.crt"]), "--tls-key", str(pki["client.key"]),
                          str(kaggle_jpegs["NORMAL"][4]))
    assert sent.returncode == 0 and "sent 1, failed 0" in sent.stdout, sent.stdout + sent.stderr


def test_tls_optional_client_certificate(tmp_path, pki):
    """require_client_certificate = false: a client without a certificate is accepted (DCMTK +tla),
    one with our CA's certificate too; a plaintext client still is not."""
    with WorkerProcess(tmp_path / "data", env=tls_env(pki, require_client_certificate=False),
                       tls=client_tls(pki, None)) as proc:
        anonymous = echoscu(proc.port, *dcmtk_tls(pki, None))
        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        assert echoscu(proc.port, *dcmtk_tls(pki)).returncode == 0
        assert echoscu(proc.port).returncode != 0
    assert proc.process.returncode == 0


def _serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update({"CXR_WORKER__STORAGE__DATA_DIR": str(tmp_path / "data"), "CXR_WORKER__NETWORK__PORT": str(free_port()),
                 "CXR_WORKER__NETWORK__BIND_ADDRESS": "127.0.0.1"})
    full.update(env)
    return subprocess.run([sys.executable, "-m", "worker", "serve"], cwd=REPO_ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def test_tls_bad_files_stop_startup_with_clear_message(tmp_path, pki):
    env = tls_env(pki, require_client_certificate=True)
    missing = _serve(tmp_path, {**env, "CXR_WORKER__TLS__CERTIFICATE": str(tmp_path / "nope.crt")})
    assert missing.returncode == 2 and "tls.certificate" in missing.stderr and "nope.crt" in missing.stderr
    mismatched = _serve(tmp_path, {**env, "CXR_WORKER__TLS__PRIVATE_KEY": str(pki["client.key"])})
    assert mismatched.returncode == 2, mismatched.stderr[-2000:]
    assert "tls.certificate/tls.private_key: cannot load" in mismatched.stderr
    not_a_ca = tmp_path / "garbage.pem"
    not_a_ca.write_text("not a certificate\n")
    bad_ca = _serve(tmp_path, {**env, "CXR_WORKER__TLS__CA_CERTIFICATES": str(not_a_ca)})
    assert bad_ca.returncode == 2 and "tls.ca_certificates" in bad_ca.stderr, bad_ca.stderr[-2000:]
    no_ca = _serve(tmp_path, {**env, "CXR_WORKER__TLS__CA_CERTIFICATES": ""})
    assert no_ca.returncode == 2 and "tls.require_client_certificate" in no_ca.stderr


def test_destination_tls_settings_validated(pki):
    from worker.settings import Destination, SettingsError

    base = dict(name="pacs", host="127.0.0.1", port=104, ae_title="PACS")
    assert Destination(**base).tls is False
    Destination(**base, tls=True, tls_ca_certificates=str(pki["ca.crt"]))
    with pytest.raises(SettingsError, match="tls_certificate and tls_private_key"):
        Destination(**base, tls=True, tls_certificate=str(pki["client.crt"]))
    with pytest.raises(SettingsError, match="tls = false"):
        Destination(**base, tls_ca_certificates=str(pki["ca.crt"]))
    with pytest.raises(SettingsError, match="no such file"):
        Destination(**base, tls=True, tls_ca_certificates="/nonexistent/ca.crt")
