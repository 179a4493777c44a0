"""The outbox keeps one association per destination open while SRs keep coming (real peers, no mocks).

worker/outbox.OutboxLoop runs in this process on its own SQLite database and delivers real SR files
(worker.sr.build_pneumonia_sr) to DCMTK storescp (`-v`: its log counts associations; `+uf`: every
delivery is its own file, so a second delivery of one SR would show) or, where the peer must
misbehave on cue (abort on a C-STORE, release an idle association), to a pynetdicom Storage SCP on
a real socket. Proven here: 20 SRs one after another over ONE association, released after
outbox.idle_release_seconds and on stop; a destination restarted between deliveries, or one that
aborts the kept association under our first C-STORE, costs no failed attempt; a destination that is
down gets backoff and then each SR exactly once; TLS; a new SOP class opens a new association;
the claim (UPDATE ... RETURNING) never gives one row to two claimers.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from testkit.env import dcmtk, free_port
from testkit.dicom_factory import make_dataset, synthetic_radiograph
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, StorageCommitmentPushModel

from trainer.checkpoint import ModelInfo, new_model_uid
from worker.store import db as dbm
from worker.net.associations import AssociationPool
from worker.store.db import Database, OutboxItem, OutboxState, Result, Study, StudyState
from worker.store.outbox import CommitmentReport, record_commitment
from worker.outbox_loop import OutboxLoop, claim_due
from worker.net.scu import store_files
from worker.settings import load_settings
from worker.sr import PneumoniaReport, build_pneumonia_sr

IDLE_S = 1.5          # outbox.idle_release_seconds in these tests
TIMEOUT_S = 5.0       # outbox.timeout: a lost C-STORE-RSP would cost this long
LONG_BACKOFF_S = 60.0  # retry_base_seconds where a counted failure must be visible as a long wait
SEND_WAIT_S = 20.0    # generous bound for one delivery on a busy 2-core machine
DEST_AET = "DEST"


@pytest.fixture(scope="module", autouse=True)
def pynetdicom_installed():
    """The outbox always runs after the service's worker.net.install() (files sent as stored)."""
    from worker.net import install

    install()


# --- SR files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sr_template() -> pydicom.Dataset:
    source = make_dataset(synthetic_radiograph(64, 64))
    source.StudyInstanceUID = generate_uid()
    model = ModelInfo(arch="resnet18", name="cxr-outbox-test", version="1", threshold=0.5, uid=new_model_uid())
    return build_pneumonia_sr(PneumoniaReport([source], 0.87, True, model))


@pytest.fixture
def make_srs(sr_template, tmp_path):
    """make_srs(n) -> n SR files (Comprehensive 3D SR, Explicit VR LE), each its own SOP Instance UID."""
    counter = iter(range(10**6))

    def make(n: int) -> list[Path]:
        paths = []
        for _ in range(n):
            ds = copy.deepcopy(sr_template)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = tmp_path / "srs" / f"sr{next(counter)}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    return make


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _add_scored_study(session, study_uid: str, model_uid: str, now: float) -> Result:
    """A done study and its result row, which outbox rows refer to (flushed: the result has its id)."""
    session.add(Study(study_uid=study_uid, status=StudyState.DONE, n_instances=1, first_received=now,
                      last_received=now, updated=now))
    session.flush()
    result = Result(study_uid=study_uid, status=StudyState.DONE, threshold=0.5, model_name="m",
                    model_version="1", model_uid=model_uid, n_instances=1, n_scored=1, created=now)
    session.add(result)
    session.flush()
    return result


# --- destinations ----------------------------------------------------------------------------------

class VerboseStoreSCP:
    """DCMTK storescp -v +uf on a fixed port; restartable; its logs count associations."""

    def __init__(self, out_dir: Path, *, port: int | None = None, options: tuple[str, ...] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.port = port or free_port()
        self.options = options
        self.process: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self) -> "VerboseStoreSCP":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir.parent / f"storescp-{self.port}-{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([dcmtk("storescp"), "-v", "+uf", "-aet", DEST_AET, "-od", str(self.out_dir),
                                             *self.options, str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SEND_WAIT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def count(self, line: str) -> int:
        return self.log().count(line)

    @property
    def associations(self) -> int:
        """Associations accepted ("Received" also counts start()'s bare TCP probe)."""
        return self.count("Association Acknowledged")

    @property
    def releases(self) -> int:
        return self.count("Association Release")

    def received(self) -> Counter:
        """SOP Instance UID -> how many times it arrived (+uf: one file per delivery)."""
        return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in self.out_dir.iterdir() if p.is_file())

    def destination(self, **extra) -> dict:
        return {"name": "dest", "host": "127.0.0.1", "port": self.port, "ae_title": DEST_AET, **extra}

    def __enter__(self) -> "VerboseStoreSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PynetdicomPeer:
    """A pynetdicom Storage SCP on a real socket that can misbehave on cue.

    ``abort_next``: abort the association on that many coming C-STORE requests instead of answering.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.ae = AE(ae_title=DEST_AET)
        self.ae.add_supported_context(Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.add_supported_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.commitment_requests: list[tuple[str, list[str]]] = []  # (Transaction UID, SOP Instance UIDs)
        self.report_on_same_association = False  # answer each request with an N-EVENT-REPORT right there
        self.report_status: list[int] = []
        self.accepted = 0
        self.requests: Counter = Counter()
        self.stored: Counter = Counter()
        self.abort_next = 0
        self.server = None

    def _on_accepted(self, event: evt.Event) -> None:
        self.accepted += 1

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.requests[uid] += 1
        if self.abort_next > 0:
            self.abort_next -= 1
            event.assoc.abort()
            return 0xA700  # never sent: the association is gone
        self.stored[uid] += 1
        return 0x0000

    def _on_action(self, event: evt.Event):
        info = event.action_information
        self.commitment_requests.append((str(info.TransactionUID),
                                         [str(r.ReferencedSOPInstanceUID) for r in info.ReferencedSOPSequence]))
        if self.report_on_same_association:
            assoc = event.assoc

            def report() -> None:  # after our N-ACTION-RSP has gone out
                from worker.net._pynetdicom.reactor import reactor_parked  # pynetdicom's send race (as ours)

                time.sleep(0.1)
                with reactor_parked(assoc):
                    rsp, _ = assoc.send_n_event_report(info, 1, StorageCommitmentPushModel,
                                                       "1.2.840.10008.1.20.1.1")
                self.report_status.append(int(rsp.Status) if rsp is not None and "Status" in rsp else -1)

            threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    def release_all(self) -> list:
        """Release every association from our side (the SCP's), as a PACS closing idle ones does."""
        assocs = list(self.server.active_associations)
        for assoc in assocs:
            assoc.release()
        return assocs

    def destination(self, **extra) -> dict:
        return {"name": "peer", "host": "127.0.0.1", "port": self.port, "ae_title": DEST_AET, **extra}

    def __enter__(self) -> "PynetdicomPeer":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_ACCEPTED, self._on_accepted),
                                                         (evt.EVT_C_STORE, self._on_store),
                                                         (evt.EVT_N_ACTION, self._on_action)])
        return self

    def __exit__(self, *exc) -> None:
        self.ae.shutdown()


# --- the outbox under test -----------------------------------------------------------------------

def _toml_inline(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


class Outbox:
    """OutboxLoop (thread) on a fresh SQLite database with one destination; SRs added as rows."""

    def __init__(self, tmp: Path, destination: dict, **outbox) -> None:
        values = {"timeout": TIMEOUT_S, "idle_release_seconds": IDLE_S, "poll_seconds": 0.05,
                  "retry_base_seconds": LONG_BACKOFF_S, "retry_max_seconds": LONG_BACKOFF_S, **outbox}
        environ = {"CXR_WORKER__STORAGE__DATA_DIR": str(tmp / "data"),
                   "CXR_WORKER__DESTINATIONS": f"[{_toml_inline(destination)}]"}
        environ.update({f"CXR_WORKER__OUTBOX__{k.upper()}": str(v) for k, v in values.items()})
        self.settings = load_settings(environ=environ)
        self.destination = self.settings.destinations[0]
        self.db = Database(f"sqlite:///{tmp / 'outbox.db'}")
        now = time.time()
        with self.db.session() as s, s.begin():
            self.result_id = _add_scored_study(s, "1.2.3", "1.2.4", now).id
        self.stop_event, self.wake = threading.Event(), threading.Event()
        self.loop = OutboxLoop(self.settings, self.db, dbm.new_owner(), self.stop_event, wake=self.wake)

    def add(self, paths: list[Path]) -> list[str]:
        """Commit one outbox row per SR and wake the sender, as the scorer does."""
        uids = [uid_of(p) for p in paths]
        now, d = time.time(), self.destination
        with self.db.session() as s, s.begin():
            for path, uid in zip(paths, uids):
                s.add(OutboxItem(result_id=self.result_id, study_uid="1.2.3", sr_sop_instance_uid=uid,
                                 sr_path=str(path), destination=d.name, host=d.host, port=d.port,
                                 ae_title=d.ae_title, status=OutboxState.PENDING, attempts=0, next_attempt=now,
                                 created=now, commitment=d.storage_commitment))
        self.wake.set()
        return uids

    def rows(self) -> dict[str, OutboxItem]:
        with self.db.session() as s:
            return {r.sr_sop_instance_uid: r for r in s.query(OutboxItem).all()}

    def wait(self, predicate, what: str, timeout: float = SEND_WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if predicate(rows):
                return rows
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}: "
                             f"{[(r.status, r.attempts, r.last_error) for r in self.rows().values()]}")

    def wait_sent(self, uids: list[str], timeout: float = SEND_WAIT_S) -> dict[str, OutboxItem]:
        return self.wait(lambda rows: all(rows[u].status == OutboxState.SENT for u in uids), f"{uids} sent", timeout)

    def __enter__(self) -> "Outbox":
        self.loop.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.wake.set()
        self.loop.join(30)
        assert not self.loop.is_alive()
        self.db.dispose()


def wait_until(predicate, what: str, timeout: float = SEND_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- tests ---------------------------------------------------------------------------------------

def test_twenty_srs_one_after_another_over_one_association_released_when_idle(make_srs, tmp_path):
    srs = make_srs(21)
    with VerboseStoreSCP(tmp_path / "in") as dest, Outbox(tmp_path, dest.destination()) as outbox:
        uids = []
        for path in srs[:20]:  # one SR per delivery, as the scorer wakes the outbox after each
            uids += outbox.add([path])
            outbox.wait_sent(uids[-1:])
        last_sent = time.monotonic()
        rows = outbox.rows()
        assert all(rows[u].attempts == 1 and rows[u].last_error is None for u in uids)
        assert dest.associations == 1, dest.log()
        assert dest.received() == Counter({u: 1 for u in uids})
        assert dest.releases == 0, "released before outbox.idle_release_seconds"

        wait_until(lambda: dest.releases == 1, "release of the idle association", IDLE_S + SEND_WAIT_S)
        idle = time.monotonic() - last_sent
        assert idle >= IDLE_S * 0.9, f"released after {idle:.2f} s idle, configured {IDLE_S} s"
        assert dest.count("Association Aborted") == 0, dest.log()

        uids += outbox.add(srs[20:])  # after the release: a new association
        outbox.wait_sent(uids[-1:])
        assert dest.associations == 2
        assert dest.received() == Counter({u: 1 for u in uids})


def test_stop_releases_the_kept_association(make_srs, tmp_path):
    with VerboseStoreSCP(tmp_path / "in") as dest:
        with Outbox(tmp_path, dest.destination(), timeout=60, idle_release_seconds=50) as outbox:
            outbox.wait_sent(outbox.add(make_srs(2)))
            assert dest.associations == 1 and dest.releases == 0
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 10, "stop waited for the idle time"
        wait_until(lambda: dest.releases == 1, "release on stop", 5)


def test_destination_restarted_between_deliveries_next_sr_goes_without_backoff(make_srs, tmp_path):
    """The peer drops the kept association (restart); the next SR leaves at once on a new one and
    no failed attempt is recorded (a counted failure would wait LONG_BACKOFF_S)."""
    srs = make_srs(3)
    dest = VerboseStoreSCP(tmp_path / "in").start()
    try:
        with Outbox(tmp_path, dest.destination()) as outbox:
            first = outbox.add(srs[:1])
            outbox.wait_sent(first)
            for path in srs[1:]:
                dest.stop()   # connection closed under the idle association
                dest.start()  # same port
                started = time.monotonic()
                uid = outbox.add([path])
                row = outbox.wait_sent(uid)[uid[0]]
                assert time.monotonic() - started < TIMEOUT_S
                assert row.attempts == 1 and row.last_error is None and row.last_status == 0
            assert dest.associations == 3
            assert dest.received() == Counter({uid_of(p): 1 for p in srs})
    finally:
        dest.stop()


def test_peer_aborts_kept_association_under_first_store_retried_once_at_once(make_srs, tmp_path):
    """An SR sent on a kept association the peer is just dropping (it aborts instead of answering)
    is sent again at once on a fresh association, without counting a failed attempt; only once."""
    srs = make_srs(3)
    with PynetdicomPeer() as peer, Outbox(tmp_path, peer.destination()) as outbox:
        first = outbox.add(srs[:1])
        outbox.wait_sent(first)
        assert peer.accepted == 1

        peer.abort_next = 1  # the kept association dies under our next C-STORE
        started = time.monotonic()
        second = outbox.add(srs[1:2])
        row = outbox.wait_sent(second)[second[0]]
        assert time.monotonic() - started < TIMEOUT_S, "waited for the DIMSE timeout instead of the abort"
        assert row.attempts == 1 and row.last_error is None
        assert peer.requests[second[0]] == 2 and peer.stored[second[0]] == 1
        assert peer.accepted == 2

        peer.abort_next = 2  # kept and fresh association both die: one retry only, then backoff
        third = outbox.add(srs[2:])
        row = outbox.wait(lambda rows: rows[third[0]].attempts == 1, "the failed try recorded")[third[0]]
        assert row.status == OutboxState.PENDING and row.last_error
        assert row.next_attempt - time.time() > LONG_BACKOFF_S / 2  # normal backoff applies
        time.sleep(0.5)
        assert peer.requests[third[0]] == 2 and peer.stored[third[0]] == 0
        assert peer.accepted == 3


def test_peer_releases_idle_association_answered_and_next_sr_delivered(make_srs, tmp_path):
    """While idle the reactor is not parked: the peer's A-RELEASE-RQ is answered at once."""
    srs = make_srs(2)
    with PynetdicomPeer() as peer, Outbox(tmp_path, peer.destination(), idle_release_seconds=4) as outbox:
        outbox.wait_sent(outbox.add(srs[:1]))
        started = time.monotonic()
        [scp_side] = peer.release_all()   # blocks until our A-RELEASE-RP (or its ACSE timeout)
        assert scp_side.is_released and not scp_side.is_aborted
        assert time.monotonic() - started < TIMEOUT_S / 2
        second = outbox.add(srs[1:])
        row = outbox.wait_sent(second)[second[0]]
        assert row.attempts == 1 and row.last_error is None
        assert peer.accepted == 2 and peer.requests[second[0]] == 1


def test_destination_down_backoff_then_each_sr_delivered_once(make_srs, tmp_path):
    srs = make_srs(3)
    dest = VerboseStoreSCP(tmp_path / "in")  # not started: nothing listens on its port
    with Outbox(tmp_path, dest.destination(), retry_base_seconds=0.5, retry_max_seconds=1.0) as outbox:
        uids = outbox.add(srs)
        rows = outbox.wait(lambda rows: all(r.attempts >= 2 for r in rows.values()), "two failed tries each")
        assert all(r.status in (OutboxState.PENDING, OutboxState.SENDING) and "cannot connect" in (r.last_error or "")
                   for r in rows.values())
        with dest:
            rows = outbox.wait_sent(uids)
            time.sleep(1.5)  # a second delivery of any of them would land now
            assert dest.received() == Counter({u: 1 for u in uids})
            assert dest.associations == 1
        assert all(r.last_error is None and r.last_status == 0 for r in rows.values())


def test_tls_destination_reuses_one_association(make_srs, tmp_path):
    from testkit.pki import make_pki

    pki = make_pki(tmp_path)
    options = ("+tls", str(pki["server.key"]), str(pki["server.crt"]), "+cf", str(pki["ca.crt"]))
    with VerboseStoreSCP(tmp_path / "in", options=options) as dest:
        tls = dict(tls=True, tls_ca_certificates=str(pki["ca.crt"]), tls_certificate=str(pki["client.crt"]),
                   tls_private_key=str(pki["client.key"]))
        with Outbox(tmp_path, dest.destination(**tls)) as outbox:
            uids = []
            for path in make_srs(4):
                uids += outbox.add([path])
                outbox.wait_sent(uids[-1:])
        assert dest.associations == 1 and dest.releases == 1, dest.log()
        assert dest.received() == Counter({u: 1 for u in uids})


def test_new_sop_class_opens_a_new_association_proposing_both(make_srs, tmp_path):
    dx = tmp_path / "dx.dcm"
    make_dataset(synthetic_radiograph(32, 32)).save_as(dx, enforce_file_format=True)
    sr1, sr2 = make_srs(2)
    pool = AssociationPool(idle_release_s=30)
    with VerboseStoreSCP(tmp_path / "in") as dest:
        try:
            for path, associations in ((sr1, 1), (dx, 2), (sr2, 2)):
                [outcome] = store_files([path], "127.0.0.1", dest.port, DEST_AET, pool=pool, timeout=TIMEOUT_S)
                assert outcome.ok, outcome
                assert dest.associations == associations, (path, dest.log())
            assert dest.releases == 1  # the SR-only association, when the DX image needed another
        finally:
            pool.close()
        wait_until(lambda: dest.releases == 2, "release on close", 5)


def test_idle_release_zero_means_one_association_per_delivery(make_srs, tmp_path):
    with VerboseStoreSCP(tmp_path / "in") as dest, \
            Outbox(tmp_path, dest.destination(), idle_release_seconds=0) as outbox:
        for path in make_srs(3):
            outbox.wait_sent(outbox.add([path]))
        wait_until(lambda: dest.releases == 3, "three released associations", 5)
        assert dest.associations == 3


def test_kept_association_outlives_the_network_timeout_while_idle(make_srs, tmp_path):
    """outbox.timeout bounds network waits, not idleness: pynetdicom's idle timeout is off while kept."""
    timeout, idle = 1.5, 4.0
    srs = make_srs(2)
    with VerboseStoreSCP(tmp_path / "in") as dest, \
            Outbox(tmp_path, dest.destination(), timeout=timeout, idle_release_seconds=idle) as outbox:
        outbox.wait_sent(outbox.add(srs[:1]))
        time.sleep(timeout + 1.0)
        assert dest.count("Association Aborted") == 0 and dest.releases == 0, dest.log()
        row = outbox.wait_sent(second := outbox.add(srs[1:]))[second[0]]
        assert row.attempts == 1 and row.last_error is None
        assert dest.associations == 1, dest.log()


# --- the claim ----------------------------------------------------------------------------------

def test_commitment_requested_over_the_kept_association_failed_resent_unknown_ignored(make_srs, tmp_path):
    with PynetdicomPeer() as peer, Outbox(tmp_path, peer.destination(storage_commitment=True),
                                          retry_base_seconds=0.2, retry_max_seconds=0.5) as box:
        uids = box.add(make_srs(2))
        wait_until(lambda: len(peer.commitment_requests) == 1, "one commitment request")
        transaction, referenced = peer.commitment_requests[0]
        assert sorted(referenced) == sorted(uids) and peer.accepted == 1  # C-STOREs and N-ACTION: one association
        rows = box.wait(lambda r: all(r[u].status == OutboxState.COMMITTING for u in uids), "committing")
        assert {r.commitment_uid for r in rows.values()} == {transaction}
        # The report, as the listener hands it over: an unknown transaction changes nothing.
        assert not record_commitment(box.db, CommitmentReport(generate_uid(), tuple(uids))).known
        recorded = record_commitment(box.db, CommitmentReport(transaction, (uids[0],), {uids[1]: 0x0112}))
        assert (recorded.committed, recorded.resend) == (1, 1)
        box.wake.set()
        wait_until(lambda: len(peer.commitment_requests) == 2, "the failed one sent and requested again")
        again, referenced = peer.commitment_requests[1]
        assert referenced == [uids[1]] and again != transaction and peer.stored[uids[1]] == 2
        rows = box.rows()
        assert rows[uids[0]].status == OutboxState.COMMITTED and rows[uids[0]].committed is not None
        # The old transaction's report again: superseded, ignored; the new one commits the resent SR.
        assert not record_commitment(box.db, CommitmentReport(transaction, (uids[1],))).known
        assert record_commitment(box.db, CommitmentReport(again, (uids[1],))).committed == 1
        rows = box.rows()
        assert all(rows[u].status == OutboxState.COMMITTED for u in uids) and peer.stored[uids[0]] == 1


def test_commitment_report_on_the_same_association_is_taken_there(make_srs, tmp_path):
    with PynetdicomPeer() as peer, Outbox(tmp_path, peer.destination(storage_commitment=True)) as box:
        peer.report_on_same_association = True
        uids = box.add(make_srs(2))
        rows = box.wait(lambda r: all(r[u].status == OutboxState.COMMITTED for u in uids), "committed", timeout=30)
        wait_until(lambda: peer.report_status, "the peer's N-EVENT-REPORT answered")
        assert peer.report_status == [0x0000] and peer.accepted == 1 and len(peer.commitment_requests) == 1
        assert {r.commitment_uid for r in rows.values()} == {peer.commitment_requests[0][0]}


def test_commitment_without_report_requested_again_after_timeout_never_committed(make_srs, tmp_path):
    with PynetdicomPeer() as peer, Outbox(tmp_path, peer.destination(storage_commitment=True, commitment_timeout=1),
                                          retry_base_seconds=0.2, retry_max_seconds=0.5) as box:
        [uid] = box.add(make_srs(1))
        wait_until(lambda: len(peer.commitment_requests) >= 3, "requested three times", timeout=30)
        transactions = [t for t, _ in peer.commitment_requests]
        assert len(set(transactions)) == len(transactions) and peer.stored[uid] == 1  # asked again, not resent
        row = box.rows()[uid]
        assert row.status != OutboxState.COMMITTED and row.committed is None
        assert "no storage commitment report" in (row.last_error or "")


def _claimers_take_disjoint_rows(url: str, rows: int = 60, claimers: int = 4, returning: bool = True) -> None:
    setup = Database(url)
    try:
        now = time.time()
        with setup.session() as s, s.begin():
            s.query(OutboxItem).delete()
            s.query(Result).delete()
            s.query(Study).delete()
            result = _add_scored_study(s, "9.9", "9.8", now)
            for i in range(rows):
                s.add(OutboxItem(result_id=result.id, study_uid="9.9", sr_sop_instance_uid=f"9.9.{i}",
                                 sr_path=f"/nowhere/{i}.dcm", destination="d", host="h", port=1, ae_title="D",
                                 status=OutboxState.PENDING, attempts=0, next_attempt=now - rows + i, created=now))
            s.add(OutboxItem(result_id=result.id, study_uid="9.9", sr_sop_instance_uid="9.9.later",
                             sr_path="/nowhere/later.dcm", destination="d", host="h", port=1, ae_title="D",
                             status=OutboxState.PENDING, attempts=0, next_attempt=now + 3600, created=now))
        taken: dict[str, list[str]] = {f"w{k}": [] for k in range(claimers)}
        barrier = threading.Barrier(claimers)

        def claimer(owner: str) -> None:
            db = Database(url, create=False)  # its own engine, as another worker process
            db.engine.dialect.update_returning = returning and db.engine.dialect.update_returning
            try:
                barrier.wait()
                while items := claim_due(db, owner, 60, limit=3):
                    assert all(i.status == OutboxState.SENDING and i.lease_owner == owner for i in items)
                    assert [i.next_attempt for i in items] == sorted(i.next_attempt for i in items)
                    taken[owner] += [i.sr_sop_instance_uid for i in items]
            finally:
                db.dispose()

        threads = [threading.Thread(target=claimer, args=(owner,)) for owner in taken]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        every = [uid for uids in taken.values() for uid in uids]
        assert sorted(every) == sorted(f"9.9.{i}" for i in range(rows))  # each exactly once, none not due
        with setup.session() as s:
            states = Counter(r.status for r in s.query(OutboxItem).all())
        assert states == Counter({OutboxState.SENDING: rows, OutboxState.PENDING: 1})
    finally:
        setup.dispose()


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "sqlite-before-3.35"])
def test_claim_sqlite_each_row_to_one_claimer(tmp_path, returning):
    _claimers_take_disjoint_rows(f"sqlite:///{tmp_path / 'claim.db'}", returning=returning)


def test_claim_postgres_skip_locked_each_row_to_one_claimer(request):
    _claimers_take_disjoint_rows(request.getfixturevalue("postgres_url"))  # skips without PostgreSQL


def _commitment_bookkeeping(url: str, rows: int = 12, claimers: int = 3) -> None:
    """claim_commitments gives each delivered row to one claimer; reports are recorded by Transaction
    UID whoever claimed; expiry sends the rest back to sent with backoff; old rows are never asked."""
    from worker.store.outbox import begin_commitment, claim_commitments, expire_commitments

    setup = Database(url)
    try:
        now = time.time()
        with setup.session() as s, s.begin():
            s.query(OutboxItem).delete()
            s.query(Result).delete()
            s.query(Study).delete()
            result = _add_scored_study(s, "8.8", "8.7", now)
            for i in range(rows):
                s.add(OutboxItem(result_id=result.id, study_uid="8.8", sr_sop_instance_uid=f"8.8.{i}",
                                 sr_path=f"/nowhere/{i}.dcm", destination="d", host="h", port=1, ae_title="D",
                                 status=OutboxState.SENT, attempts=1, next_attempt=now - 1, created=now, sent=now,
                                 commitment=True))
            s.add(OutboxItem(result_id=result.id, study_uid="8.8", sr_sop_instance_uid="8.8.old",
                             sr_path="/nowhere/old.dcm", destination="d", host="h", port=1, ae_title="D",
                             status=OutboxState.SENT, attempts=1, next_attempt=now - 1, created=now, sent=now))
        taken: dict[str, list[OutboxItem]] = {f"w{k}": [] for k in range(claimers)}
        barrier = threading.Barrier(claimers)

        def claimer(owner: str) -> None:
            db = Database(url, create=False)
            try:
                barrier.wait()
                while items := claim_commitments(db, owner, 60, limit=2):
                    assert all(i.status == OutboxState.COMMITTING and i.lease_owner == owner for i in items)
                    begin_commitment(db, owner, [i.id for i in items], f"2.25.{owner[1:]}{len(taken[owner])}", 30)
                    taken[owner] += items
            finally:
                db.dispose()

        threads = [threading.Thread(target=claimer, args=(owner,)) for owner in taken]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        every = sorted(i.sr_sop_instance_uid for items in taken.values() for i in items)
        assert every == sorted(f"8.8.{i}" for i in range(rows))  # each once; the pre-commitment row never
        with setup.session() as s:
            by_uid = {r.sr_sop_instance_uid: r for r in s.query(OutboxItem).all()}
        first = by_uid["8.8.0"]
        batch = [u for u, r in by_uid.items() if r.commitment_uid == first.commitment_uid]
        recorded = record_commitment(setup, CommitmentReport(first.commitment_uid, tuple(batch)))
        assert recorded.committed == len(batch) >= 1 and recorded.resend == 0
        late = expire_commitments(setup, time.time() + 31, lambda attempts: 100.0 * attempts)
        assert late == rows - len(batch)
        with setup.session() as s:
            states = Counter(r.status for r in s.query(OutboxItem).all())
            again = s.query(OutboxItem).filter(OutboxItem.status == OutboxState.SENT,
                                               OutboxItem.sr_sop_instance_uid != "8.8.old").all()
        assert states == Counter({OutboxState.COMMITTED: len(batch), OutboxState.SENT: rows - len(batch) + 1})
        assert all(r.attempts == 2 and r.next_attempt > time.time() + 150 and r.lease_owner is None for r in again)
        assert all("no storage commitment report" in r.last_error for r in again)
    finally:
        setup.dispose()


def test_commitment_bookkeeping_sqlite(tmp_path):
    _commitment_bookkeeping(f"sqlite:///{tmp_path / 'commit.db'}")


def test_commitment_bookkeeping_postgres_skip_locked(request):
    _commitment_bookkeeping(request.getfixturevalue("postgres_url"))  # skips without PostgreSQL


def test_dicomweb_secret_missing_from_the_environment_stops_start_up(tmp_path, monkeypatch):
    from worker.errors import SettingsError

    monkeypatch.delenv("CXR_TEST_NO_SUCH_TOKEN", raising=False)
    web = {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:9/dw", "auth": "bearer",
           "token_env": "CXR_TEST_NO_SUCH_TOKEN"}
    with pytest.raises(SettingsError, match=r"^destinations\.web\.token_env: environment variable "
                                            r"CXR_TEST_NO_SUCH_TOKEN is not set"):
        Outbox(tmp_path, web)
    monkeypatch.setenv("CXR_TEST_NO_SUCH_TOKEN", "t0k")
    box = Outbox(tmp_path / "again", web)
    assert box.loop.secrets == {"web": "t0k"} and box.destination.is_dicomweb
    box.db.dispose()
