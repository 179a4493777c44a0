"""Three `cxr-worker serve` processes on one PostgreSQL database and one shared data_dir.

Real PostgreSQL 15 (testkit/postgres.py), three real serve processes on their own ports, DCMTK storescu
as the senders and DCMTK storescp as the SR destination, real Kaggle films wrapped as DX. Studies are
spread over the workers and some are split: one instance to one worker, the other to another. One
worker is SIGKILLed while it holds claims (scoring studies or SRs being sent) with a second sender
still on its association, its claims are taken over by the others after the lease
(``studies.lease_seconds`` = 5 s here), it is restarted, and that sender resends what it sent (a
modality retries what got no Success). Then: every instance recorded once, every study one result,
scored once per revision, one SR per revision at the destination, every outbox row sent, nothing
left claimed.

Where the test may create PID namespaces (root, util-linux ``unshare``), the killed worker runs in
its own one: its lease owner then names another "host" (store/db.owner_is_dead_here cannot look at
its pid), so its claims can only be taken over when its lease expires, as for a worker on another
machine. Otherwise the others see its pid gone and take over at once.

The soak variant (``--slow`` or CXR_SOAK=1) sends more studies and kills two workers, one in each way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from testkit.postgres import fresh_database
from testkit.worker_process import StoreSCP, WorkerProcess, dcmtk, url_rows, wrap_jpeg

pytestmark = pytest.mark.dcmtk

LEASE_SECONDS = 5
WORKERS = 3
SCORED = ("done", "no_eligible_images", "failed")


def _own_pid_namespace() -> tuple[str, ...]:
    """A launcher that runs the worker in a PID namespace of its own (dies with its parent), or ()."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return ()
    launcher = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")
    try:
        ok = subprocess.run([*launcher, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return launcher if ok else ()


def _films(kaggle_root: Path, n: int) -> list[Path]:
    per_class = (n + 1) // 2
    jpegs = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((kaggle_root / "train" / cls).glob("*.jpeg"))[:per_class]]
    assert len(jpegs) >= n
    return jpegs[:n]


def _send(port: int, files: list[Path], aet: str) -> subprocess.Popen:
    return subprocess.Popen([dcmtk("storescu"), "-aet", aet, "-aec", "CXR_WORKER", "127.0.0.1", str(port),
                             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _send_all(jobs: list[tuple[int, list[Path]]]) -> None:
    procs = [_send(port, files, f"MOD{i}") for i, (port, files) in enumerate(jobs) if files]
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-2000:]


def _owners(data: Path) -> dict[Path, str]:
    """The workers' incoming folders and the owner written in each one's lock file."""
    return {lock.parent: lock.read_text() for lock in (data / "incoming").glob("*/.lock")}


def _start_together(workers: list[WorkerProcess]) -> None:
    """Start workers at the same moment (their schema creation races: db.SCHEMA_LOCK)."""
    errors: list[BaseException] = []

    def start(w: WorkerProcess) -> None:
        try:
            w.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors


def _kill_while_claiming(victim: WorkerProcess, owner: str, url: str, timeout: float = 90.0) -> list[tuple]:
    """SIGKILL ``victim`` as soon as it holds a claim (a scoring study or an SR being sent); returns
    the claims it held then as (table, id, lease_expires)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = ([("studies", i, e) for i, e in url_rows(url, "select id, lease_expires from studies where "
                                                            "status='scoring' and lease_owner=?", owner)]
                + [("outbox", i, e) for i, e in url_rows(url, "select id, lease_expires from outbox where "
                                                           "status='sending' and lease_owner=?", owner)])
        if held:
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            return held
        time.sleep(0.02)
    raise AssertionError(f"the worker never held a claim within {timeout} s:\n{victim.log()[-3000:]}")


def _wait_taken_over(url: str, owner: str, timeout: float = 60.0) -> float:
    """Wait until no row is leased to ``owner`` any more; returns when (epoch s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = (url_rows(url, "select count(*) from studies where lease_owner=?", owner)[0][0]
                + url_rows(url, "select count(*) from outbox where lease_owner=?", owner)[0][0])
        if not left:
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"claims of the killed worker {owner} not taken over within {timeout} s")


def _wait_all_done(url: str, n_studies: int, workers: list[WorkerProcess], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        for w in workers:
            assert w.process.poll() is None, f"a worker died:\n{w.log()[-3000:]}"
        state = url_rows(url, "select "
                              "(select count(*) from studies), "
                              "(select count(*) from studies where status not in ('done','no_eligible_images','failed')), "
                              "(select count(*) from results), "
                              "(select count(*) from outbox where status <> 'sent')")[0]
        if state[0] == n_studies and state[1] == 0 and state[2] == n_studies and state[3] == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"not finished within {timeout} s: (studies, unfinished, results, unsent) = {state}\n"
                         + "\n".join(w.log()[-1500:] for w in workers))


def _status(url: str) -> dict:
    """What `cxr-worker status --json` reports (worker/cli/reports.py, read in-process)."""
    from worker.cli.reports import status_report
    from worker.store.db import Database

    db = Database(url, create=False)
    try:
        return status_report(db)
    finally:
        db.dispose()


def _run(tmp_path: Path, pg_cluster: str, films: list[Path], n_split: int, kills: list[str]) -> None:
    """``kills``: the workers to SIGKILL in turn, each "namespace" (its own PID namespace when possible:
    takeover by lease expiry) or "local" (same namespace: takeover by the dead pid)."""
    url = fresh_database(pg_cluster, f"multi_{os.getpid()}_{len(films)}")
    data = tmp_path / "data"
    n_single = len(films) - 2 * n_split
    # single-image studies dealt round-robin; a split study's two images go to two different workers
    per_worker: list[list[Path]] = [[] for _ in range(WORKERS)]
    expected: dict[str, int] = {}
    jpeg = iter(films)
    for i in range(n_single):
        uid = generate_uid()
        per_worker[i % WORKERS].append(wrap_jpeg(next(jpeg), tmp_path / "in" / f"s{i}.dcm", study_uid=uid))
        expected[uid] = 1
    for i in range(n_split):
        uid = generate_uid()
        for half in range(2):
            path = wrap_jpeg(next(jpeg), tmp_path / "in" / f"p{i}-{half}.dcm", study_uid=uid)
            per_worker[(i + half) % WORKERS].append(path)
        expected[uid] = 2
    n_instances = sum(expected.values())

    launcher = _own_pid_namespace()
    env = {"CXR_WORKER__STUDIES__LEASE_SECONDS": str(LEASE_SECONDS),
           "CXR_WORKER__MODEL__BATCH_SIZE": "8", "CXR_WORKER__MODEL__MAX_STUDIES_PER_BATCH": "4"}
    with StoreSCP(tmp_path / "dest") as dest:
        def worker(k: int, port: int | None = None, ns: bool = False) -> WorkerProcess:
            return WorkerProcess(data, port=port, quiet=1.0, destinations=[dest.destination()], env=env,
                                 database_url=url, name=f"worker{k}", launcher=launcher if ns else ())

        kinds = dict(enumerate(kills))  # worker k is killed in the way kills[k]
        workers = [worker(k, ns=kinds.get(k) == "namespace") for k in range(WORKERS)]
        try:
            _start_together(workers)
            owners = _owners(data)
            assert len(owners) == WORKERS                        # one locked incoming folder per worker
            owner_of = {}
            for w in workers:  # which owner is which worker: its pid (1 in a PID namespace of its own)
                pid = "1" if w.launcher else str(w.process.pid)
                [owner_of[w.port]] = [o for o in owners.values() if o.rsplit(":", 2)[1] == pid]
            # first halves of every worker's share at once, the rest later (per victim: during its kill)
            halves = [(files[: len(files) // 2], files[len(files) // 2:]) for files in per_worker]
            _send_all([(w.port, first) for w, (first, _) in zip(workers, halves)])
            for k, kind in kinds.items():
                victim, rest = workers[k], halves[k][1]
                sender = _send(victim.port, rest, f"LATE{k}")          # on its association as it dies
                held = _kill_while_claiming(victim, owner_of[victim.port], url)
                killed_at = time.time()
                if kind == "namespace" and launcher:   # `cxr-worker status` shows whose claims wait, and how long
                    [lease] = [e for e in _status(url)["leases"] if e["owner"] == owner_of[victim.port]]
                    assert lease["studies"] + lease["outbox"] >= 1 and lease["expires_in_s"] <= LEASE_SECONDS
                sender.communicate(timeout=120)
                taken = _wait_taken_over(url, owner_of[victim.port])
                if kind == "namespace" and launcher:
                    # another "host": only the lease could free its claims, never before it expired
                    assert taken >= min(e for _, _, e in held) - 0.5, (taken, held)
                survivors = {folder for folder, o in _owners(data).items() if o != owner_of[victim.port]}
                workers[k] = worker(k, port=victim.port, ns=kind == "namespace").start()
                assert survivors <= set(_owners(data))               # its start-up left live folders alone
                _send_all([(workers[k].port, rest)])                  # the sender retries what it sent
                print(f"killed worker{k} ({kind}) holding {len(held)} claims; taken over "
                      f"{taken - killed_at:.1f} s later")
            for w, (first, rest) in zip(workers, halves):
                if workers.index(w) not in kinds:
                    _send_all([(w.port, rest)])
            _wait_all_done(url, len(expected), workers)
            assert _status(url)["leases"] == []
            # clean stops: exit 0
            assert [w.stop() for w in workers] == [0] * WORKERS
        finally:
            for w in workers:
                w.kill()
        logs = "\n".join(w.log() for w in workers)
        assert "scorer loop error" not in logs and "deadlock" not in logs.lower() and "UniqueViolation" not in logs

        # every instance once, each study counting its own instances (resends not counted)
        instances = url_rows(url, "select study_uid, count(*), count(distinct sop_instance_uid) from instances "
                                  "group by study_uid")
        assert {uid: n for uid, n, _ in instances} == expected
        assert all(n == distinct for _, n, distinct in instances)
        assert url_rows(url, "select count(*) from instances")[0][0] == n_instances
        studies = {uid: (status, rev, owner, n) for uid, status, rev, owner, n in
                   url_rows(url, "select study_uid, status, revision, lease_owner, n_instances from studies")}
        assert set(studies) == set(expected)
        assert {s for s, *_ in studies.values()} == {"done"}
        assert all(owner is None for _, _, owner, _ in studies.values())             # nothing left claimed
        assert all(rev >= 1 for _, rev, _, _ in studies.values())
        # one result per study, of its last revision, over all its instances
        results = url_rows(url, "select study_uid, revision, n_instances, n_scored, sr_sop_instance_uid from results")
        assert Counter(uid for uid, *_ in results) == Counter({uid: 1 for uid in expected})
        for uid, rev, n, scored, _ in results:
            assert (rev, n, scored) == (studies[uid][1], expected[uid], expected[uid]), uid
        # one outbox row per SR revision, all sent by exactly one worker, none leased
        outbox = url_rows(url, "select study_uid, sr_sop_instance_uid, status, lease_owner from outbox")
        per_study = Counter(uid for uid, *_ in outbox)
        assert per_study == Counter({uid: studies[uid][1] for uid in expected})
        assert {(status, owner) for *_, status, owner in outbox} == {("sent", None)}
        # the destination holds exactly one SR per revision (a resend after the kill is the same SOP
        # Instance UID, which the destination keeps once)
        received: dict[str, set] = defaultdict(set)
        numbers: dict[str, list] = defaultdict(list)
        sr_uids = {sop for _, sop, _, _ in outbox}
        for ds in dest.files():
            if ds.SOPInstanceUID in sr_uids and ds.SOPInstanceUID not in received[ds.StudyInstanceUID]:
                received[ds.StudyInstanceUID].add(ds.SOPInstanceUID)
                numbers[ds.StudyInstanceUID].append(int(ds.InstanceNumber))
        assert {uid: len(sops) for uid, sops in received.items()} == {uid: studies[uid][1] for uid in expected}
        assert all(sorted(n) == list(range(1, studies[uid][1] + 1)) for uid, n in numbers.items())
        assert len(list((data / "sr").rglob("*.dcm"))) == len(outbox)
        # clean stops removed their own incoming folders; only killed workers' are left (lock free)
        assert len(_owners(data)) <= len(kills)
        split_revisions = Counter(studies[uid][1] for uid, n in expected.items() if n == 2)
        print(f"{len(expected)} studies ({n_split} split over two workers; their revisions {dict(split_revisions)}), "
              f"{n_instances} instances, {len(outbox)} SRs delivered")


def test_three_workers_one_postgres_one_killed(tmp_path, postgres_url, kaggle_root):
    _run(tmp_path, postgres_url, _films(kaggle_root, 76), n_split=12, kills=["namespace"])


@pytest.mark.slow
def test_three_workers_soak(request, tmp_path, postgres_url, kaggle_root):
    if not (request.config.getoption("--slow") or os.environ.get("CXR_SOAK") == "1"):
        pytest.skip("soak: run with --slow or CXR_SOAK=1")
    _run(tmp_path, postgres_url, _films(kaggle_root, 240), n_split=40, kills=["namespace", "local"])


def test_a_second_worker_on_one_sqlite_data_dir_is_refused(tmp_path):
    """A live worker holds its incoming folder's lock (here: this test process, through the same
    store/spool code); a serve on the same data_dir with SQLite stops with one line, exit 2."""
    from worker.store.db import new_owner
    from worker.store.spool import Spool

    data = tmp_path / "data"
    holder = Spool(data)
    holder.take_incoming(new_owner())
    try:
        out = WorkerProcess(data, name="second").cli("serve")
    finally:
        holder.release_incoming()
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert "storage.database_url" in line and "PostgreSQL" in line and "another cxr-worker" in line, line


def test_data_dir_without_hard_links_into_spool_is_refused_for_several_workers(tmp_path, postgres_url):
    """spool/ on another filesystem than incoming/ (a symlink to /dev/shm, tmpfs): the start-up check
    cannot hard-link a received file into it, so a worker that shares the data_dir (PostgreSQL)
    refuses to start, one line naming storage.data_dir, exit 2."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to put spool/ on")
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = Path(shm / f"cxr-spool-{os.getpid()}")
    elsewhere.mkdir(exist_ok=True)
    (data / "spool").symlink_to(elsewhere)
    try:
        out = WorkerProcess(data, database_url=fresh_database(postgres_url, "nolinks"), name="nolinks").cli("serve")
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert "storage.data_dir" in line and "hard-linking incoming/ into spool/ failed" in line, line
    assert "Invalid cross-device link" in line
