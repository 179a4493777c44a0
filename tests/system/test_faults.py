"""Faults with real processes: kill -9 during a push, the PACS down then up, the spool unwritable or full.

Every test here FAILS if anything that was answered Success is lost, if a study ends with more or
fewer than one SR (per revision), or if the listener stops serving.

Fast variants run by default (CI). The soak variant (more kills, more studies) runs with
`pytest --slow` or `CXR_SOAK=1`. The kill moments come from a seeded RNG; the seed is printed
(`-s` shows it, and it is in the assertion messages); `CXR_FAULT_SEED=<n>` replays a run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from testkit.env import dcmtk
from testkit.worker_process import StoreSCP, WorkerProcess, db_rows, partial_receptions, storescu, wrap_jpeg

pytestmark = pytest.mark.dcmtk


def _seed() -> int:
    return int(os.environ.get("CXR_FAULT_SEED") or random.SystemRandom().randrange(1, 2**31))



# -- the corpus: real Kaggle films wrapped as DX, made once per session ---------------------------
def _make_corpus(root: Path, kaggle_root: Path, n_single: int, n_double: int) -> dict[str, list[Path]]:
    """{study_uid: [files]}: n_single one-image studies and n_double two-image studies."""
    jpegs = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((kaggle_root / "train" / cls).glob("*.jpeg"))
             [: n_single + 2 * n_double]]
    jpegs.sort(key=lambda p: p.name)  # mix classes deterministically
    studies: dict[str, list[Path]] = {}
    it = iter(jpegs)
    for s in range(n_single + n_double):
        uid = generate_uid()
        studies[uid] = [wrap_jpeg(next(it), root / f"s{s:03d}_{i}.dcm", study_uid=uid,
                                  AccessionNumber=f"F{s:04d}") for i in range(1 if s < n_single else 2)]
    return studies


@pytest.fixture(scope="session")
def fault_corpus(tmp_path_factory, kaggle_root):
    """50 studies, 60 instances (40 one-image, 10 two-image studies)."""
    return _make_corpus(tmp_path_factory.mktemp("fault-corpus"), kaggle_root, 40, 10)


# -- a sender that resends whatever did not get Success -------------------------------------------
_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+?)\)")


def storescu_acked(port: int, files: list[Path]) -> tuple[set[Path], int, str]:
    """DCMTK storescu -v on ``files`` (one association); the files answered Success, exit code, log."""
    proc = subprocess.run([dcmtk("storescu"), "-v", "-nh", "-to", "10", "-ta", "10", "-td", "20",
                           "-aet", "FAULT_SCU", "-aec", "CXR_WORKER", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    acked, current = set(), None
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) == "Success":
                acked.add(current)
            current = None
    return acked, proc.returncode, proc.stderr[-2000:]


class Sender(threading.Thread):
    """Pushes all files over ``associations`` parallel storescu runs until every file got Success."""

    def __init__(self, port: int, files: list[Path], associations: int, deadline_s: float) -> None:
        super().__init__(name="fault-sender", daemon=True)
        self.port, self.files, self.associations = port, list(files), associations
        self.deadline = time.monotonic() + deadline_s
        self.acked: set[Path] = set()
        self.passes = 0
        self.failed_runs = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                with self.lock:
                    pending = [f for f in self.files if f not in self.acked]
                if not pending:
                    return
                self.passes += 1
                chunks = [pending[i::self.associations] for i in range(self.associations)]
                results: list = [None] * len(chunks)

                def one(i: int) -> None:
                    results[i] = storescu_acked(self.port, chunks[i])

                threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chunks)) if chunks[i]]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                progress = False
                for r in results:
                    if r is None:
                        continue
                    acked, rc, _ = r
                    self.failed_runs += rc != 0
                    with self.lock:
                        progress |= bool(acked - self.acked)
                        self.acked |= acked
                if not progress:
                    time.sleep(0.3)  # the worker is down (being restarted): try again shortly
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def n_acked(self) -> int:
        with self.lock:
            return len(self.acked)


def _kill_push_restart(tmp_path: Path, studies: dict[str, list[Path]], kills: int, associations: int,
                       seed: int, time_budget_s: float) -> None:
    rng = random.Random(seed)
    print(f"\nfault seed {seed} (replay with CXR_FAULT_SEED={seed}): {kills} kills, {len(studies)} studies, "
          f"{sum(map(len, studies.values()))} instances, {associations} associations")
    files = [f for fs in studies.values() for f in fs]
    rng.shuffle(files)  # instances of a study are not always adjacent (as from a real modality queue)
    sop_of = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study_of = {f: uid for uid, fs in studies.items() for f in fs}
    data = tmp_path / "data"
    started = time.monotonic()
    events: list[str] = []
    with StoreSCP(tmp_path / "dest", options=("+uf",)) as dest:   # +uf: every delivery is its own file
        worker = WorkerProcess(data, quiet=0.5, destinations=[dest.destination()]).start()
        sender = Sender(worker.port, files, associations, deadline_s=time_budget_s)
        try:
            sender.start()
            for k in range(kills):
                # Random moments: early ones hit the push, later ones the scorer and the outbox.
                time.sleep(rng.uniform(0.2, 3.0))
                worker.stop(signal.SIGKILL)
                events.append(f"kill {k + 1} at {time.monotonic() - started:.1f}s, {sender.n_acked()} acked")
                worker = WorkerProcess(data, port=worker.port, quiet=0.5, destinations=[dest.destination()]).start()
            sender.join(timeout=max(5.0, time_budget_s - (time.monotonic() - started)))
            context = f"seed {seed}; " + "; ".join(events)
            assert sender.error is None, f"{context}: sender failed: {sender.error!r}"
            assert not sender.is_alive(), f"{context}: push did not complete in time ({sender.n_acked()} acked)"
            assert sender.acked == set(files), context
            print("; ".join(events) + f"; push done after {sender.passes} passes, "
                  f"{sender.failed_runs} interrupted storescu runs")

            # A sender whose association died may resend everything: nothing changes.
            acked, rc, log = storescu_acked(worker.port, files)
            assert rc == 0 and acked == set(files), log

            # Every study is scored and its SR delivered.
            def all_delivered():
                done = db_rows(data, "select count(*) from studies where status='done'")[0][0]
                unsent = db_rows(data, "select count(*) from outbox where status!='sent'")[0][0]
                return done == len(studies) and unsent == 0
            worker.wait_for(all_delivered, timeout=max(30.0, time_budget_s - (time.monotonic() - started)),
                            what=f"all {len(studies)} studies scored and delivered ({context})")
            time.sleep(1.5)  # > quiet period: a spurious re-score would show up now
            assert all_delivered(), context
        finally:
            sender.deadline = 0  # stop resending if the test failed half-way
            try:
                worker.stop()
            except subprocess.TimeoutExpired:
                pass
        sender.join(timeout=30)
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dest.out_dir.iterdir())
                    if p.is_file()]

    # 1. Every instance that got Success is in the database and on disk, byte for byte.
    rows = {sop: (study, path) for sop, study, path in db_rows(data, "select sop_instance_uid, study_uid, path "
                                                                    "from instances")}
    for f in files:
        sop = sop_of[f]
        assert sop in rows, f"seed {seed}: acknowledged instance {sop} missing from the database"
        assert rows[sop][0] == study_of[f]
        spooled = Path(rows[sop][1])
        assert spooled.is_file(), f"seed {seed}: acknowledged instance {sop} missing from the spool"
        assert pydicom.dcmread(spooled).PixelData == pydicom.dcmread(f).PixelData
    assert len(rows) == len(files)  # nothing extra, no duplicate rows

    # 2. One result per study, covering all its instances; one SR per revision, each delivered.
    results = {u: (rev, n, status) for u, rev, n, status in
               db_rows(data, "select study_uid, revision, n_scored, status from results")}
    assert set(results) == set(studies) and len(db_rows(data, "select id from results")) == len(studies)
    by_study: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for ds in received:
        assert ds.Modality == "SR"
        by_study[str(ds.StudyInstanceUID)][str(ds.SOPInstanceUID)].append(int(ds.InstanceNumber))
    repeats = 0
    for uid, fs in studies.items():
        revision, n_scored, status = results[uid]
        assert status == "done" and n_scored == len(fs), (uid, results[uid])
        srs = by_study.get(uid, {})
        # Exactly one SR per revision (a study split by a crash is re-scored as revision 2: a new SR).
        assert sorted(n[0] for n in srs.values()) == list(range(1, revision + 1)), (seed, uid, dict(srs))
        if len(fs) == 1:
            assert revision == 1 and len(srs) == 1, (seed, uid, dict(srs))
        # The same SR delivered twice is only possible when a kill hit between the destination's
        # answer and our commit (at-least-once on the wire; same SOP Instance UID, so idempotent).
        repeats += sum(len(v) - 1 for v in srs.values())
    assert repeats <= kills, f"seed {seed}: {repeats} repeated SR deliveries with only {kills} kills"
    assert set(by_study) == set(studies)
    outbox = db_rows(data, "select sr_sop_instance_uid, count(*) from outbox group by sr_sop_instance_uid "
                           "having count(*) > 1")
    assert outbox == []
    print(f"ok: {len(files)} instances stored, {len(studies)} results, "
          f"{sum(len(v) for v in by_study.values())} SRs, {repeats} repeated deliveries, "
          f"{time.monotonic() - started:.0f}s")


def test_kill9_during_push_nothing_acknowledged_is_lost(fault_corpus, tmp_path):
    _kill_push_restart(tmp_path, fault_corpus, kills=3, associations=2, seed=_seed(), time_budget_s=150)


@pytest.mark.slow
def test_kill9_soak(request, tmp_path, kaggle_root):
    if not (request.config.getoption("--slow") or os.environ.get("CXR_SOAK") == "1"):
        pytest.skip("soak: run with --slow or CXR_SOAK=1")
    studies = _make_corpus(tmp_path / "corpus", kaggle_root, 160, 40)
    _kill_push_restart(tmp_path / "run", studies, kills=int(os.environ.get("CXR_SOAK_KILLS", "12")),
                       associations=4, seed=_seed(), time_budget_s=900)


# -- the destination PACS (Orthanc) down, then up --------------------------------------------------
@pytest.mark.orthanc
def test_orthanc_down_srs_wait_in_outbox_then_delivered_once(fault_corpus, tmp_path):
    from testkit.orthanc import OrthancServer

    studies = dict(list(fault_corpus.items())[:6])  # 6 one-image studies
    files = [f for fs in studies.values() for f in fs]
    with OrthancServer() as pacs:
        destination = {"name": "orthanc", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet}
        pacs.stop()                                   # the PACS is down
        with WorkerProcess(tmp_path / "data", destinations=[destination]) as worker:
            sent = storescu(worker.port, *files)
            assert sent.returncode == 0, sent.stderr

            def waiting():
                st = worker.status()
                return st if (st["studies"]["done"] == len(studies) and st["outbox"]["sent"] == 0
                              and st["outbox"]["pending"] + st["outbox"]["sending"] == len(studies)
                              and st["delivery_errors"]) else None
            st = worker.wait_for(waiting, timeout=60, what="all SRs waiting in the outbox")
            assert all(e["destination"] == "orthanc" and e["attempts"] >= 1 and e["error"]
                       for e in st["delivery_errors"])
            assert all(r["waiting"] == 1 and r["delivered"] == 0 for r in worker.results())

            pacs.start()                              # same ports and storage: the PACS is back
            worker.wait_for(lambda: worker.status()["outbox"]["sent"] == len(studies), timeout=60,
                            what="delivery after Orthanc came back")
            time.sleep(1.5)                           # a second delivery would land now
            st = worker.status()
            assert st["outbox"] == {"pending": 0, "sending": 0, "sent": len(studies), "committing": 0, "committed": 0}
            for uid in studies:
                found = pacs.study_instances(uid)
                assert len(found) == 1, (uid, found)   # exactly one SR per study in the PACS
                tags = pacs.instance_tags(found[0]["ID"])
                assert tags["Modality"] == "SR" and tags["StudyInstanceUID"] == uid
            assert all(r["delivered"] == 1 and r["waiting"] == 0 for r in worker.results())
        assert worker.process.returncode == 0, worker.log()[-3000:]


# -- the spool unwritable, the disk full -----------------------------------------------------------
def _store_status(port: int, path: Path) -> int | None:
    from worker.net.scu import store_files

    (outcome,) = store_files([path], "127.0.0.1", port, "CXR_WORKER", "FAULT_SCU", timeout=20)
    return outcome.status


def test_spool_path_not_a_directory_answers_a700_and_recovers(fault_corpus, tmp_path):
    """Portable 'unwritable spool': tests run as root, where chmod stops nothing; a FILE named spool/ does."""
    (study1, files1), (study2, files2) = list(fault_corpus.items())[6:8]
    data = tmp_path / "data"
    with WorkerProcess(data) as worker:
        spool = data / "spool"
        spool.rename(data / "spool.away")
        spool.write_bytes(b"not a directory")
        try:
            for _ in range(2):                        # twice: the listener keeps serving after a failure
                assert _store_status(worker.port, files1[0]) == 0xA700
                assert worker.echo()
        finally:
            spool.unlink()
            (data / "spool.away").rename(spool)
        assert "answering 0xA700" in worker.log()
        assert db_rows(data, "select count(*) from instances") == [(0,)]   # nothing half-recorded
        assert _store_status(worker.port, files1[0]) == 0x0000            # the sender's retry works
        assert _store_status(worker.port, files2[0]) == 0x0000
        worker.wait_for(lambda: db_rows(data, "select count(*) from results where status='done'") == [(2,)],
                        what="both studies scored")
        assert not partial_receptions(data)                               # no partial files left behind


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs (root + mount permitted); skipped where the sandbox forbids mounting."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a tiny tmpfs")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_answers_failure_listener_survives_then_recovers(fault_corpus, tmp_path, tiny_filesystem):
    (study1, files1), (study2, files2) = list(fault_corpus.items())[8:10]
    data = tiny_filesystem                           # incoming/, spool/, sr/ on the tiny filesystem (log beside it)
    db_path = tmp_path / "db" / "worker.db"          # the database elsewhere (its disk is not full)
    db_path.parent.mkdir()
    # the watermark off (storage.min_free_bytes = 0): this is the disk filling while a data set arrives
    # (the watermark itself: tests/system/test_http.py)
    with WorkerProcess(data, env={"CXR_WORKER__STORAGE__DATABASE_URL": f"sqlite:///{db_path}",
                                  "CXR_WORKER__STORAGE__MIN_FREE_BYTES": "0"}) as worker:
        filler = tiny_filesystem / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:                                          # fill the filesystem to the last byte
            for block in (65536, 512, 1):
                try:
                    while os.write(fd, b"\0" * block):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)
        try:
            for _ in range(2):
                # 0xA700 Out of Resources (before worker/net/_pynetdicom/spool_file.py: an A-ABORT and no status at all)
                assert _store_status(worker.port, files1[0]) == 0xA700
                assert worker.echo()
        finally:
            filler.unlink()
        assert "No space left on device" in worker.log()
        con = sqlite3.connect(db_path)
        try:
            assert con.execute("select count(*) from instances").fetchall() == [(0,)]
        finally:
            con.close()
        assert _store_status(worker.port, files1[0]) == 0x0000
        assert _store_status(worker.port, files2[0]) == 0x0000
        worker.wait_for(lambda: sqlite3.connect(db_path).execute(
            "select count(*) from results where status='done'").fetchall() == [(2,)], what="both studies scored")
        assert not partial_receptions(data)


# -- regression: the outbox commits each accepted SR as it is answered -----------------------------
class _Crash(BaseException):
    """Stands in for kill -9 half-way through a delivery batch (escapes every `except Exception`)."""


def test_outbox_commits_each_accepted_sr_before_the_batch_ends(tmp_path, monkeypatch):
    """A crash after the destination accepted SR 1 of 3 must not re-send SR 1 (the batch used to be
    committed only after the association, so a crash re-sent every SR of the batch)."""
    import threading as _threading

    from worker.net import scu
    from worker.store.db import Database, OutboxItem, OutboxState, Result, Study, StudyState
    from worker.outbox_loop import OutboxLoop, claim_due
    from worker.net.scu import StoreOutcome
    from worker.settings import load_settings

    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": str(tmp_path)})
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    try:
        now = time.time()
        with db.session() as s, s.begin():
            s.add(Study(study_uid="1.0", status=StudyState.DONE, n_instances=1, first_received=now,
                        last_received=now, updated=now))
            s.flush()
            result = Result(study_uid="1.0", status=StudyState.DONE, threshold=0.5, model_name="m", model_version="1",
                            model_uid="3.1", n_instances=1, n_scored=1, created=now)
            s.add(result)
            s.flush()
            for i in range(3):
                s.add(OutboxItem(result_id=result.id, study_uid="1.0", sr_sop_instance_uid=f"2.{i}",
                                 sr_path=str(tmp_path / f"sr{i}.dcm"), destination="d", host="127.0.0.1", port=1,
                                 ae_title="D", status=OutboxState.PENDING, attempts=0, next_attempt=now, created=now))
        loop = OutboxLoop(settings, db, "owner-1", _threading.Event())
        items = claim_due(db, "owner-1", 60)

        def store_files(paths, *args, on_outcome=None, **kwargs):
            on_outcome(StoreOutcome(Path(paths[0]), "2.0", 0x0000))
            raise _Crash()

        monkeypatch.setattr(scu, "store_files", store_files)
        with pytest.raises(_Crash):
            loop.deliver(("127.0.0.1", 1, "D", "d"), items)
        with db.session() as s:
            states = dict(s.execute(select_outbox_states()).all())
        assert states == {"2.0": "sent", "2.1": "sending", "2.2": "sending"}
    finally:
        db.dispose()


def select_outbox_states():
    from sqlalchemy import select

    from worker.store.db import OutboxItem
    return select(OutboxItem.sr_sop_instance_uid, OutboxItem.status)
