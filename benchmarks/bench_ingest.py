#!/usr/bin/env python
"""Ingest and end-to-end throughput of `cxr-worker serve` against a bare pynetdicom SCP and DCMTK storescp.

    python benchmarks/bench_ingest.py --quick            # smoke test: 12 studies per encoding, 1 repeat
    python benchmarks/bench_ingest.py                    # 120 studies per encoding, 3 repeats (medians)
    python benchmarks/bench_ingest.py --py-spy /tmp/prof # also profile the worker (py-spy, collapsed stacks)
    python benchmarks/bench_ingest.py --receivers worker --heatmaps both --syntax explicit  # heatmaps' cost

For each encoding (uncompressed Explicit VR LE, JPEG Lossless SV1) the same N single-image studies
(2500x2048, 12-bit, made by make_study_files.py; fresh UIDs every run) are pushed by DCMTK
`storescu` over ONE association (`-R +sd DIR`, `-pdu 131072`, env TCP_NODELAY=1), on 127.0.0.1, into
each receiver, each started fresh on a free port:

  worker        `cxr-worker serve` doing its full job: spool (fsync) + SQLite, quiet period, decode,
                score, result, SR, outbox -> a DCMTK storescp destination (also fresh, own port).
                Config = the shipped config/worker.toml, except port/bind/data dir/destination and
                studies.quiet_seconds (--quiet, default 0.2 s) via CXR_WORKER__... variables.
  worker-noheat (--heatmaps both) the same worker with heatmaps off ([heatmap] studies = "none"); `worker`
                runs the shipped [heatmap] defaults (a Segmentation and a key image for every image of
                each positive study, sent before its SR); the end-to-end ratio on/off is printed.
  worker-rx     the same worker with scoring held back (quiet_seconds = 1 h): its receive path alone.
  worker2-pg    TWO `cxr-worker serve` processes on one throwaway PostgreSQL database (tests/testkit/
                postgres.py: Debian's postgresql server, started for this run) and one shared data_dir,
                the same full job; the same N files split between them, one storescu association
                each, both started at once. Its ratio to `worker` (same files, same sitting) is the
                cost of PostgreSQL and of two processes sharing the cores (on 2 cores it cannot be faster).
  bare          benchmarks/bare_scp.py: pynetdicom, chunked receive, rename, Success. Nothing else.
  storescp      DCMTK storescp (+B bit-preserving, +xa, -pdu 131072) writing files.

Ingest rate = N / (storescu start .. storescu exit) and MB/s of the files sent. For the worker also:
  end-to-end    N / (storescu start .. the last SR accepted by the destination), from the worker DB
                (outbox.sent), cross-checked with the files the destination received;
  latency       per study: SR accepted (outbox.sent) - last instance recorded (studies.last_received)
                - quiet_seconds, p50/p95, for the burst above (a backlog builds whenever ingest
                outruns scoring, so burst latency is mostly queueing) and for a PACED run: M more
                studies, one storescu association each, every 1/--paced-rate seconds.
Per-study worker timings (results.decode_s, inference_s, sr_s, total_s) are reported as medians.

Every process this starts runs in its own session and is stopped (SIGTERM, then SIGKILL) in a
finally block; every wait is bounded. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_study_files import dcmtk_tool, write_studies

WORKER_AET = "CXR_WORKER"
DEST_AET = "BENCH_DEST"
PDU = 131072
SYNTAX_LABEL = {"explicit": "uncompressed (Explicit VR LE)", "jpegll": "JPEG Lossless SV1 (.4.70)"}
TARGETS = {"ingest_vs_bare": 0.9, "e2e_explicit": 30.0, "e2e_jpegll": 10.0, "p95_latency_s": 1.0,
           "heatmaps_on_vs_off": 0.8}


# ------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float, aet: str = "ANY") -> None:
    """Until a C-ECHO to 127.0.0.1:port succeeds (DCMTK echoscu).

    Not a bare TCP connect: a connection that never sends an A-ASSOCIATE-RQ keeps a pynetdicom
    acceptor thread waiting acse_timeout (30 s), and the worker's stop() waits for it.
    """
    echoscu = dcmtk_tool("echoscu")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening on {port}")
        ok = subprocess.run([echoscu, "-aet", "BENCH_SCU", "-aec", aet, "-to", "5", "127.0.0.1", str(port)],
                            capture_output=True, env=dcmtk_env(), timeout=30, check=False).returncode == 0
        if ok:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no C-ECHO answer from 127.0.0.1:{port} after {timeout:.0f} s")


class Proc:
    """A child in its own session; stop() ends it (and only it and its children) in bounded time."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
        self.cmd = cmd
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, grace: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._fh.close()
        return self.p.returncode


def dcmtk_env() -> dict:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"   # DCMTK: without it Nagle + delayed ACK stall each response ~40-90 ms
    return env


def storescu_cmd(storescu: str, port: int, aec: str, syntax: str, opts: list[str], paths: list[str]) -> list[str]:
    # -R: only the presentation contexts the files need; -xs: also propose JPEG Lossless SV1 (without
    # it storescu proposes uncompressed only and would have to decompress, or fail, on .4.70 files)
    ts = ["-xs"] if syntax == "jpegll" else []
    return [storescu, "-aet", "BENCH_SCU", "-aec", aec, "-pdu", str(PDU), "-R", *ts, *opts, "127.0.0.1", str(port),
            *paths]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) of a live process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_snapshot(worker_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the worker's main process, by its child processes (the decoders),
    by every core of the machine (busy = not idle/iowait), and by the children this script has reaped
    (storescu). Differences of two snapshots say where a burst's CPU went."""
    stats = {int(d.name): _proc_stat(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
    main = stats.get(worker_pid)
    children = sum(st[1] for st in stats.values() if st is not None and st[0] == worker_pid)
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS   # user..steal minus idle, iowait
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"worker": main[1] if main else 0.0, "decoders": children, "machine": busy,
            "storescu": reaped.ru_utime + reaped.ru_stime, "wall": time.monotonic()}


def cpu_per_study(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """ms of CPU per study for each part, and the machine's busy share of its cores over the interval."""
    out = {k: (after[k] - before[k]) * 1000 / n for k in ("worker", "decoders", "storescu", "machine")}
    wall = after["wall"] - before["wall"]
    out["machine_busy_pct"] = 100 * (after["machine"] - before["machine"]) / (wall * (os.cpu_count() or 1))
    return out


def run_storescu(storescu: str, port: int, aec: str, source: Path | list[Path], log: Path,
                 timeout: float, syntax: str) -> tuple[float, float]:
    """Send a directory (+sd) or file list over one association; (wall start, seconds)."""
    opts, paths = (["+sd"], [str(source)]) if isinstance(source, Path) else ([], [str(p) for p in source])
    cmd = storescu_cmd(storescu, port, aec, syntax, opts, paths)
    with open(log, "ab") as fh:
        wall = time.time()
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dcmtk_env(), timeout=timeout, check=False)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu exited {proc.returncode} (see {log})")
    return wall, seconds


def start_storescp(storescp: str, out: Path, log: Path) -> tuple[Proc, int]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = Proc([storescp, "-aet", DEST_AET, "+B", "+xa", "-pdu", str(PDU), "-od", str(out), str(port)], log,
                env=dcmtk_env())
    wait_port(port, proc.p, 20, DEST_AET)
    return proc, port


def dcm_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


# -------------------------------------------------------------------------------------- results
@dataclass
class Run:
    receiver: str
    syntax: str
    n: int
    nbytes: int
    ingest_s: float
    received: int
    e2e_s: float | None = None
    srs: int | None = None
    dest_files: int | None = None
    latency: list[float] = field(default_factory=list)
    paced_latency: list[float] = field(default_factory=list)
    paced_rate: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)   # CPU seconds during the burst, see cpu_snapshot

    @property
    def ingest_rate(self) -> float:
        return self.n / self.ingest_s

    @property
    def mbps(self) -> float:
        return self.nbytes / self.ingest_s / 1e6

    @property
    def e2e_rate(self) -> float | None:
        return self.n / self.e2e_s if self.e2e_s else None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def read_worker_db(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def worker_progress(db_path: Path) -> tuple[int, int, int]:
    """(instances recorded, studies finished (any terminal state), SRs sent)."""
    if not db_path.exists():
        return 0, 0, 0
    try:
        with contextlib.closing(read_worker_db(db_path)) as c:
            inst = c.execute("SELECT count(*) FROM instances").fetchone()[0]
            fin = c.execute("SELECT count(*) FROM studies WHERE status IN "
                            "('done','no_eligible_images','failed')").fetchone()[0]
            sent = c.execute("SELECT count(*) FROM outbox WHERE status='sent'").fetchone()[0]
        return inst, fin, sent
    except sqlite3.Error:
        return 0, 0, 0


def wait_worker(db_path: Path, n_studies: int, timeout: float) -> bool:
    """Until every study is finished and every SR it produced is sent (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, fin, sent = worker_progress(db_path)
        if fin >= n_studies:
            with contextlib.closing(read_worker_db(db_path)) as c:
                want = c.execute("SELECT count(*) FROM outbox").fetchone()[0]
            if sent >= want:
                return True
        time.sleep(0.05)
    return False


def worker_latencies(db_path: Path, study_uids: set[str] | None, quiet: float) -> tuple[list[float], float | None, dict]:
    """(latencies, last SR sent (epoch), stage medians) for the given studies (None = all)."""
    with contextlib.closing(read_worker_db(db_path)) as c:
        rows = c.execute("SELECT s.study_uid, s.last_received, max(o.sent) FROM studies s "
                         "JOIN outbox o ON o.study_uid = s.study_uid WHERE o.status='sent' "
                         "GROUP BY s.study_uid").fetchall()
        res = c.execute("SELECT study_uid, decode_s, inference_s, sr_s, total_s FROM results").fetchall()
    rows = [r for r in rows if study_uids is None or r[0] in study_uids]
    lat = [sent - last - quiet for _, last, sent in rows]
    last_sent = max((r[2] for r in rows), default=None)
    res = [r for r in res if study_uids is None or r[0] in study_uids]
    stages = {}
    for i, name in enumerate(("decode_s", "inference_s", "sr_s", "total_s"), start=1):
        vals = [r[i] for r in res if r[i] is not None]
        if vals:
            stages[name] = statistics.median(vals)
    return lat, last_sent, stages


def study_uids_of(files: list[Path]) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
            for f in files}


# ------------------------------------------------------------------------------------- receivers
def bench_bare(syntax: str, files_dir: Path, n: int, nbytes: int, work: Path, storescu: str, timeout: float) -> Run:
    out = work / "bare"
    port = free_port()
    proc = Proc([sys.executable, str(Path(__file__).with_name("bare_scp.py")), "--port", str(port), "--out", str(out),
                 "--max-pdu", str(PDU)], work / "bare.log")
    try:
        wait_port(port, proc.p, 30, "BARE_SCP")
        cpu0 = cpu_snapshot(proc.pid)
        _, secs = run_storescu(storescu, port, "BARE_SCP", files_dir, work / "storescu-bare.log", timeout, syntax)
        cpu = cpu_per_study(cpu0, cpu_snapshot(proc.pid), n)
    finally:
        proc.stop()
    run = Run("bare", "", n, nbytes, secs, len(dcm_files(out)), cpu=cpu)
    shutil.rmtree(out, ignore_errors=True)
    return run


def bench_storescp(syntax: str, files_dir: Path, n: int, nbytes: int, work: Path, storescu: str, storescp: str,
                   timeout: float) -> Run:
    out = work / "storescp"
    proc, port = start_storescp(storescp, out, work / "storescp.log")
    try:
        cpu0 = cpu_snapshot(proc.pid)
        _, secs = run_storescu(storescu, port, DEST_AET, files_dir, work / "storescu-storescp.log", timeout, syntax)
        cpu = cpu_per_study(cpu0, cpu_snapshot(proc.pid), n)
    finally:
        proc.stop()
    run = Run("storescp", "", n, nbytes, secs, len(dcm_files(out)), cpu=cpu)
    shutil.rmtree(out, ignore_errors=True)
    return run


class Scraper(threading.Thread):
    """GET /metrics and /readyz every ``every`` seconds while the worker ingests (a busy Prometheus and a
    load balancer; Prometheus itself scrapes every 15-60 s)."""

    def __init__(self, base: str, every: float = 1.0) -> None:
        super().__init__(name="scraper", daemon=True)
        self.base, self.every = base, every
        self.count = self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not self._done.wait(self.every):
                try:
                    ok = client.get(self.base + "/metrics").status_code == 200
                    ok = client.get(self.base + "/readyz").status_code == 200 and ok
                    self.count += ok
                    self.errors += not ok
                except httpx.HTTPError:
                    self.errors += 1

    def stop(self) -> None:
        self._done.set()
        if self.ident is not None:
            self.join(15)


def bench_worker(syntax: str, files_dir: Path, n: int, nbytes: int, work: Path, storescu: str, storescp: str, timeout: float,
                 quiet: float, receive_only: bool = False, paced_dir: Path | None = None, paced_rate: float = 4.0,
                 extra_env: dict | None = None, py_spy: Path | None = None, http: bool = True,
                 heatmaps: bool = True) -> Run:
    name = ("worker-rx" if receive_only else "worker") + ("" if http else "-nohttp") + ("" if heatmaps else "-noheat")
    data = work / name
    dest_out = work / f"{name}-dest"
    dest, dest_port = start_storescp(storescp, dest_out, work / f"{name}-dest.log")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "CXR_WORKER__NETWORK__PORT": str(port),
        "CXR_WORKER__NETWORK__BIND_ADDRESS": '"127.0.0.1"',
        "CXR_WORKER__STORAGE__DATA_DIR": f'"{data}"',
        "CXR_WORKER__STUDIES__QUIET_SECONDS": str(3600.0 if receive_only else quiet),
        "CXR_WORKER__DESTINATIONS": f'[{{name="bench", host="127.0.0.1", port={dest_port}, ae_title="{DEST_AET}"}}]',
        "CXR_WORKER__HTTP__ENABLED": "true" if http else "false",
    })
    if not heatmaps:  # on: the shipped [heatmap] defaults (objects of positive studies)
        env["CXR_WORKER__HEATMAP__STUDIES"] = '"none"'
    http_port = free_port()
    env["CXR_WORKER__HTTP__PORT"] = str(http_port)
    env.update(extra_env or {})
    scraper = Scraper(f"http://127.0.0.1:{http_port}") if http else None
    cmd = [sys.executable, "-m", "worker", "serve"]
    worker = Proc(cmd, work / f"{name}.log", env=env, cwd=REPO)
    spy: Proc | None = None
    db_path = data / "worker.db"
    try:
        wait_port(port, worker.p, 180, WORKER_AET)
        if py_spy:
            py_spy.parent.mkdir(parents=True, exist_ok=True)
            spy = Proc(["py-spy", "record", "--pid", str(worker.pid), "--rate", "200", "--threads", "--idle", "--subprocesses",
                        "--format", "raw", "-o", str(py_spy)], work / "py-spy.log")
            time.sleep(1.0)
        if scraper is not None:
            scraper.start()
        cpu0 = cpu_snapshot(worker.pid)
        wall0, secs = run_storescu(storescu, port, WORKER_AET, files_dir, work / f"storescu-{name}.log", timeout, syntax)
        inst, _, _ = worker_progress(db_path)
        run = Run(name, "", n, nbytes, secs, inst)
        if scraper is not None:
            run.stages["http_scrapes_during_burst"] = scraper.count
        if receive_only:
            run.cpu = cpu_per_study(cpu0, cpu_snapshot(worker.pid), n)
            return run
        burst_uids = study_uids_of(dcm_files(files_dir))
        if not wait_worker(db_path, n, timeout):
            run.errors.append(f"timeout: not all studies finished/SRs sent within {timeout:.0f} s")
        run.cpu = cpu_per_study(cpu0, cpu_snapshot(worker.pid), n)
        lat, last_sent, stages = worker_latencies(db_path, burst_uids, quiet)
        run.latency, run.stages = lat, {**run.stages, **stages}
        run.srs = len(lat)
        run.e2e_s = (last_sent - wall0) if last_sent else None
        if spy is not None:
            spy.stop(grace=60, sig=signal.SIGINT)   # py-spy writes its output on SIGINT
            spy = None
        if paced_dir is not None:
            paced = sorted(dcm_files(paced_dir))
            procs = []
            t0 = time.monotonic()
            for i, f in enumerate(paced):
                delay = t0 + i / paced_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                fh = open(work / "storescu-paced.log", "ab")  # noqa: SIM115 - closed below
                procs.append((subprocess.Popen(storescu_cmd(storescu, port, WORKER_AET, syntax, [], [str(f)]), stdout=fh,
                                               stderr=subprocess.STDOUT, env=dcmtk_env()), fh))
            for p, fh in procs:
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                fh.close()
            if not wait_worker(db_path, n + len(paced), timeout):
                run.errors.append("paced: timeout")
            run.paced_latency, _, _ = worker_latencies(db_path, study_uids_of(paced), quiet)
            run.paced_rate = paced_rate
        run.dest_files = len(dcm_files(dest_out))
        return run
    finally:
        if scraper is not None:
            scraper.stop()
            if scraper.errors:
                print(f"  note: {scraper.errors} failed scrapes of {name}'s /metrics", file=sys.stderr)
        if spy is not None:
            spy.stop(grace=60, sig=signal.SIGINT)
        rc = worker.stop(grace=60)
        dest.stop()
        if rc not in (0, None, -signal.SIGTERM):
            print(f"  note: worker exited with {rc} (log {work / f'{name}.log'})", file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(dest_out, ignore_errors=True)


def pg_rows(url: str, sql: str) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def bench_workers_pg(syntax: str, files_dir: Path, n: int, nbytes: int, work: Path, storescu: str, storescp: str,
                     timeout: float, quiet: float, pg_cluster: str, tag: str, workers: int = 2,
                     extra_env: dict | None = None) -> Run:
    """``workers`` serve processes, one PostgreSQL database, one data_dir; the files split between them."""
    from testkit.postgres import fresh_database

    name = f"worker{workers}-pg"
    url = fresh_database(pg_cluster, f"bench_{tag}")
    data = work / name
    dest_out = work / f"{name}-dest"
    dest, dest_port = start_storescp(storescp, dest_out, work / f"{name}-dest.log")
    procs: list[Proc] = []
    ports = [free_port() for _ in range(workers)]
    try:
        for k, port in enumerate(ports):
            env = dict(os.environ)
            env.update({
                "CXR_WORKER__NETWORK__PORT": str(port),
                "CXR_WORKER__HTTP__PORT": str(free_port()),  # each worker its own HTTP face too
                "CXR_WORKER__NETWORK__BIND_ADDRESS": '"127.0.0.1"',
                "CXR_WORKER__STORAGE__DATA_DIR": f'"{data}"',
                "CXR_WORKER__STORAGE__DATABASE_URL": f'"{url}"',
                "CXR_WORKER__STUDIES__QUIET_SECONDS": str(quiet),
                "CXR_WORKER__DESTINATIONS": f'[{{name="bench", host="127.0.0.1", port={dest_port}, ae_title="{DEST_AET}"}}]',
            })
            env.update(extra_env or {})
            procs.append(Proc([sys.executable, "-m", "worker", "serve"], work / f"{name}-{k}.log", env=env, cwd=REPO))
            wait_port(port, procs[-1].p, 180, WORKER_AET)  # one after the other: each start-up has the cores
        files = sorted(dcm_files(files_dir))
        logs = [open(work / f"storescu-{name}-{k}.log", "ab") for k in range(workers)]  # noqa: SIM115 - closed below
        wall0 = time.time()
        start = time.perf_counter()
        senders = [subprocess.Popen(storescu_cmd(storescu, port, WORKER_AET, syntax, [], [str(f) for f in files[k::workers]]),
                                    stdout=logs[k], stderr=subprocess.STDOUT, env=dcmtk_env())
                   for k, port in enumerate(ports)]
        codes = [p.wait(timeout) for p in senders]
        secs = time.perf_counter() - start
        for fh in logs:
            fh.close()
        if any(codes):
            raise RuntimeError(f"storescu exited {codes} (see {work})")
        inst = pg_rows(url, "SELECT count(*) FROM instances")[0][0]
        run = Run(name, "", n, nbytes, secs, inst)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fin, unsent = pg_rows(url, "SELECT (SELECT count(*) FROM studies WHERE status IN ('done',"
                                       "'no_eligible_images','failed')), (SELECT count(*) FROM outbox WHERE "
                                       "status <> 'sent')")[0]
            if fin >= n and unsent == 0:
                break
            time.sleep(0.05)
        else:
            run.errors.append(f"timeout: not all studies finished/SRs sent within {timeout:.0f} s")
        rows = pg_rows(url, "SELECT s.last_received, max(o.sent) FROM studies s JOIN outbox o ON "
                            "o.study_uid = s.study_uid WHERE o.status='sent' GROUP BY s.study_uid, s.last_received")
        run.latency = [sent - last - quiet for last, sent in rows]
        run.srs = len(rows)
        last_sent = max((r[1] for r in rows), default=None)
        run.e2e_s = (last_sent - wall0) if last_sent else None
        res = pg_rows(url, "SELECT decode_s, inference_s, sr_s, total_s FROM results")
        run.stages = {k: statistics.median(r[i] for r in res) for i, k in
                      enumerate(("decode_s", "inference_s", "sr_s", "total_s")) if res}
        run.dest_files = len(dcm_files(dest_out))
        return run
    finally:
        for proc in procs:
            rc = proc.stop(grace=60)
            if rc not in (0, None, -signal.SIGTERM):
                print(f"  note: a worker exited with {rc} (logs {work / name}-*.log)", file=sys.stderr)
        dest.stop()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(dest_out, ignore_errors=True)


# ------------------------------------------------------------------------------------------ main
def median_run(runs: list[Run]) -> Run:
    """The run with the median ingest time (its other numbers come with it); latencies pooled."""
    ordered = sorted(runs, key=lambda r: r.ingest_s)
    mid = ordered[len(ordered) // 2]
    if mid.e2e_s is not None:
        e2e = sorted(r.e2e_s for r in runs if r.e2e_s)
        mid.e2e_s = e2e[len(e2e) // 2] if e2e else None
        mid.latency = [x for r in runs for x in r.latency]
        mid.paced_latency = [x for r in runs for x in r.paced_latency]
        mid.errors = [e for r in runs for e in r.errors]
    return mid


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


#: Variants of a worker receiver compared with it in the same sitting: <name><suffix> is <name> with
#: the HTTP face off (--http both) or with heatmaps off (--heatmaps both).
VARIANTS = ("-nohttp", "-noheat")


def _base(rec: str) -> str:
    for suffix in VARIANTS:
        rec = rec.removesuffix(suffix)
    return rec


def _order(receivers: list[str], rep: int) -> list[str]:
    """The receivers of one repeat: on odd repeats each ``X`` / ``X-nohttp`` (``X-noheat``) pair runs
    the other way round, so neither side of an on/off comparison always runs first."""
    if rep % 2 == 0:
        return receivers
    order = list(receivers)
    for i, rec in enumerate(order[:-1]):
        if order[i + 1] in (f"{rec}{suffix}" for suffix in VARIANTS):
            order[i], order[i + 1] = order[i + 1], rec
    return order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("-n", type=int, default=120, help="studies per encoding per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per receiver (medians reported)")
    ap.add_argument("--syntax", choices=("explicit", "jpegll", "both"), default="both")
    ap.add_argument("--receivers", default="bare,storescp,worker-rx,worker,worker2-pg",
                    help="comma-separated subset of bare,storescp,worker-rx,worker,worker2-pg")
    ap.add_argument("--quiet", type=float, default=0.2, help="worker studies.quiet_seconds (subtracted from latency)")
    ap.add_argument("--paced", type=int, default=40, help="studies in the paced latency run (0 = none)")
    ap.add_argument("--paced-rate", type=float, default=4.0, help="studies/s in the paced run")
    ap.add_argument("--templates", type=int, default=40, help="distinct pictures (studies cycle through them)")
    ap.add_argument("--timeout", type=float, default=600, help="bound on every wait, seconds")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temp dir, removed at the end)")
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra CXR_WORKER__... overrides for the worker (e.g. CXR_WORKER__MODEL__PRECISION=bf16)")
    ap.add_argument("--py-spy", type=Path, help="profile the worker during each burst into DIR (raw collapsed stacks)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="smoke test: n=12, 1 repeat, 6 paced studies")
    ap.add_argument("--http", choices=("on", "off", "both"), default="on",
                    help="the worker's HTTP face (scraped every second while on); both: each worker receiver "
                         "also runs as <name>-nohttp, same files, and the ingest ratio on/off is printed")
    ap.add_argument("--heatmaps", choices=("on", "off", "both"), default="on",
                    help="heatmap objects (the shipped [heatmap] defaults: a Segmentation and a key image per "
                         "image of each positive study, sent before its SR); both: the worker receiver also runs "
                         "as worker-noheat, same files, and the end-to-end ratio on/off is printed")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.paced, args.templates = 12, 1, 6, 12
    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if args.http != "on":
        with_off = []
        for r in receivers:
            if r in ("worker", "worker-rx"):
                with_off += [r, f"{r}-nohttp"] if args.http == "both" else [f"{r}-nohttp"]
            else:
                with_off.append(r)
        receivers = with_off
    if args.heatmaps != "on":
        receivers = [v for r in receivers for v in
                     (([r, f"{r}-noheat"] if args.heatmaps == "both" else [f"{r}-noheat"])
                      if r in ("worker", "worker-nohttp") else [r])]
    syntaxes = ["explicit", "jpegll"] if args.syntax == "both" else [args.syntax]
    extra_env = dict(kv.split("=", 1) for kv in args.worker_env)
    storescu, storescp = dcmtk_tool("storescu"), dcmtk_tool("storescp")

    busy = subprocess.run(["pgrep", "-a", "cxr-train"], capture_output=True, text=True, check=False).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "worker", "dicom_io", "config"],
                           capture_output=True, text=True, check=False).stdout.strip()
    print(f"code: {head or '?'}{' + uncommitted changes in worker/dicom_io/config' if dirty else ''}")
    print(f"machine: {os.cpu_count()} cores; storescu {storescu}; N={args.n} studies x {args.repeats} runs per "
          f"receiver; worker quiet_seconds={args.quiet}{'; QUICK (smoke test)' if args.quick else ''}")
    if busy:
        print(f"WARNING: other heavy processes are running; these timings are NOT valid measurements:\n    {busy}")
    if extra_env:
        print(f"worker overrides: {extra_env}")

    work = args.work or Path(tempfile.mkdtemp(prefix="cxr-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Run]] = {}
    pg_cluster = None  # a generator (tests/testkit/postgres.py) holding a throwaway PostgreSQL cluster
    try:
        if "worker2-pg" in receivers:
            sys.path.insert(0, str(REPO / "tests"))
            from testkit.postgres import postgres_cluster

            pg_cluster = postgres_cluster()
            pg_url = next(pg_cluster)
            print(f"PostgreSQL for worker2-pg: {pg_url}")
        for syntax in syntaxes:
            print(f"\n== {SYNTAX_LABEL[syntax]}", flush=True)
            table[syntax] = {}
            runs: dict[str, list[Run]] = {r: [] for r in receivers}
            for rep in range(args.repeats):
                files_dir = work / f"{syntax}-{rep}"
                files = write_studies(files_dir, args.n, syntax, templates=args.templates, tag=f"{syntax[0]}{rep}")
                nbytes = sum(f.stat().st_size for f in files)
                paced_dir = None
                if args.paced and "worker" in receivers:
                    paced_dir = work / f"{syntax}-{rep}-paced"
                    write_studies(paced_dir, args.paced, syntax, templates=args.templates, tag=f"p{syntax[0]}{rep}")
                # The files just written are still being written back to disk: without this the first receiver
                # of every repeat would share the disk with that writeback (its fsyncs wait behind it).
                os.sync()
                for rec in _order(receivers, rep):
                    t = time.perf_counter()
                    if rec == "bare":
                        run = bench_bare(syntax, files_dir, args.n, nbytes, work, storescu, args.timeout)
                    elif rec == "storescp":
                        run = bench_storescp(syntax, files_dir, args.n, nbytes, work, storescu, storescp, args.timeout)
                    elif _base(rec) in ("worker", "worker-rx"):
                        spy = args.py_spy / f"{rec}-{syntax}-{rep}.txt" if args.py_spy and rep == 0 else None
                        run = bench_worker(syntax, files_dir, args.n, nbytes, work, storescu, storescp, args.timeout,
                                           args.quiet, receive_only=rec.startswith("worker-rx"),
                                           paced_dir=paced_dir if rec == "worker" else None,
                                           paced_rate=args.paced_rate, extra_env=extra_env, py_spy=spy,
                                           http="-nohttp" not in rec, heatmaps="-noheat" not in rec)
                    elif rec == "worker2-pg":
                        run = bench_workers_pg(syntax, files_dir, args.n, nbytes, work, storescu, storescp,
                                               args.timeout, args.quiet, pg_url, f"{syntax}{rep}", extra_env=extra_env)
                    else:
                        raise SystemExit(f"unknown receiver {rec!r}")
                    run.syntax = syntax
                    runs[rec].append(run)
                    extra = ""
                    if run.e2e_s:
                        extra = (f", end-to-end {run.e2e_rate:.1f} studies/s, burst latency p50/p95 "
                                 f"{fmt(pct(run.latency, .5), '.2f')}/{fmt(pct(run.latency, .95), '.2f')} s, paced p95 "
                                 f"{fmt(pct(run.paced_latency, .95), '.2f')} s")
                    print(f"  run {rep + 1} {rec:<9} ingest {run.ingest_rate:6.1f} studies/s {run.mbps:6.1f} MB/s "
                          f"(received {run.received}/{run.n}){extra}  [{time.perf_counter() - t:.0f} s]"
                          + (f"  ERRORS: {run.errors}" if run.errors else ""), flush=True)
                shutil.rmtree(files_dir, ignore_errors=True)
                if paced_dir:
                    shutil.rmtree(paced_dir, ignore_errors=True)
            for rec in receivers:
                table[syntax][rec] = median_run(runs[rec])
    finally:
        if pg_cluster is not None:
            pg_cluster.close()  # stops the cluster, removes its files
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    # ----------------------------------------------------------------------------------- report
    print(f"\nINGEST (storescu start..exit, one association, N={args.n}, median of {args.repeats}):")
    head = f"{'encoding':<32}{'receiver':<11}{'studies/s':>10}{'MB/s':>8}{'recv':>9}{'/bare':>8}{'/storescp':>10}"
    print(head)
    print("-" * len(head))
    verdicts: list[tuple[str, bool | None, str]] = []
    for syntax, recs in table.items():
        bare, scp = recs.get("bare"), recs.get("storescp")
        for name, r in recs.items():
            vb = f"{r.ingest_rate / bare.ingest_rate:.2f}" if bare else "-"
            vs = f"{r.ingest_rate / scp.ingest_rate:.2f}" if scp else "-"
            print(f"{SYNTAX_LABEL[syntax]:<32}{name:<11}{r.ingest_rate:10.1f}{r.mbps:8.1f}{f'{r.received}/{r.n}':>9}"
                  f"{vb:>8}{vs:>10}")
        if "worker-rx" in recs and bare:  # the target is about ingest alone; the full job's ratio is shown above
            ratio = recs["worker-rx"].ingest_rate / bare.ingest_rate
            verdicts.append((f"{syntax}: ingest alone (worker-rx) >= {TARGETS['ingest_vs_bare']}x bare pynetdicom SCP",
                             ratio >= TARGETS["ingest_vs_bare"], f"{ratio:.2f}x"))
        for name in ("worker-rx", "worker"):
            if name in recs and f"{name}-nohttp" in recs:
                on, off = recs[name], recs[f"{name}-nohttp"]
                print(f"{SYNTAX_LABEL[syntax]:<32}{name} ingest HTTP on / off: {on.ingest_rate:.1f} / "
                      f"{off.ingest_rate:.1f} studies/s = {on.ingest_rate / off.ingest_rate:.3f} "
                      f"({on.stages.get('http_scrapes_during_burst', 0):.0f} scrapes of /metrics + /readyz during "
                      "the burst)")
        for name, r in recs.items():
            if r.cpu and name != "worker":
                print(f"{'':<32}{name} CPU per instance: receiver {r.cpu['worker']:.1f} ms, storescu "
                      f"{r.cpu['storescu']:.1f} ms, whole machine {r.cpu['machine']:.1f} ms "
                      f"({r.cpu['machine_busy_pct']:.0f}% of {os.cpu_count()} cores busy)")
    if any("worker" in recs for recs in table.values()):
        print(f"\nWORKER END-TO-END (receive, persist, score, SQLite (worker2-pg: PostgreSQL), SR accepted by the destination; "
              f"quiet_seconds={args.quiet} subtracted from latency):")
        head = (f"{'encoding':<32}{'e2e studies/s':>14}{'SRs':>9}{'burst p50':>10}{'burst p95':>10}"
                f"{'paced':>8}{'paced p50':>10}{'paced p95':>10}   per-study medians (decode/infer/SR/total s)")
        print(head)
        print("-" * len(head))
        for syntax, recs in table.items():
            for label in ("worker", "worker-noheat", "worker2-pg"):
                r = recs.get(label)
                if not r:
                    continue
                st = r.stages
                stages = "/".join(fmt(st.get(k), ".3f") for k in ("decode_s", "inference_s", "sr_s", "total_s"))
                print(f"{(SYNTAX_LABEL[syntax] + ('' if label == 'worker' else f' ({label})')):<32}"
                      f"{fmt(r.e2e_rate):>14}{f'{r.srs}/{r.n}':>9}"
                      f"{fmt(pct(r.latency, .5), '.2f'):>10}{fmt(pct(r.latency, .95), '.2f'):>10}"
                      f"{fmt(r.paced_rate, '.0f') + '/s':>8}{fmt(pct(r.paced_latency, .5), '.2f'):>10}"
                      f"{fmt(pct(r.paced_latency, .95), '.2f'):>10}   {stages}"
                      + (f"   ERRORS: {r.errors}" if r.errors else ""))
                if r.cpu:
                    c = r.cpu
                    print(f"{'':<32}CPU per study during the burst: worker main process {c['worker']:.0f} ms + decode "
                          f"processes {c['decoders']:.0f} ms + storescu {c['storescu']:.0f} ms; whole machine "
                          f"{c['machine']:.0f} ms ({c['machine_busy_pct']:.0f}% of {os.cpu_count()} cores busy)")
                if label != "worker":  # the targets are the one worker's
                    continue
                target = TARGETS[f"e2e_{syntax}"]
                verdicts.append((f"{syntax}: sustained end-to-end >= {target:.0f} studies/s",
                                 r.e2e_rate is not None and r.e2e_rate >= target, f"{fmt(r.e2e_rate)} studies/s"))
                p95b, p95p = pct(r.latency, .95), pct(r.paced_latency, .95)
                verdicts.append((f"{syntax}: p95 latency < {TARGETS['p95_latency_s']:.0f} s (burst of {r.n})",
                                 p95b is not None and p95b < TARGETS["p95_latency_s"], f"{fmt(p95b, '.2f')} s"))
                if r.paced_latency:
                    verdicts.append((f"{syntax}: p95 latency < {TARGETS['p95_latency_s']:.0f} s (paced {r.paced_rate:g}/s)",
                                     p95p is not None and p95p < TARGETS["p95_latency_s"], f"{fmt(p95p, '.2f')} s"))
    heat = [(s, recs["worker"], recs["worker-noheat"]) for s, recs in table.items()
            if "worker" in recs and "worker-noheat" in recs]
    if heat:
        print("\nHEATMAPS ON vs OFF (same files, same sitting, order alternating; on = the shipped [heatmap] "
              "defaults):")
        for syntax, on, off in heat:
            e2e = on.e2e_rate / off.e2e_rate if on.e2e_rate and off.e2e_rate else None
            print(f"  {SYNTAX_LABEL[syntax]:<32} end-to-end {fmt(on.e2e_rate)} vs {fmt(off.e2e_rate)} studies/s "
                  f"(ratio {fmt(e2e, '.2f')}); files at the destination {on.dest_files} vs {off.dest_files}; "
                  f"SR+objects stage median {fmt(on.stages.get('sr_s'), '.3f')} vs {fmt(off.stages.get('sr_s'), '.3f')} s")
            verdicts.append((f"{syntax}: end-to-end with heatmaps >= {TARGETS['heatmaps_on_vs_off']}x without",
                             e2e is not None and e2e >= TARGETS["heatmaps_on_vs_off"], fmt(e2e, ".2f")))
    pairs = [(s, recs["worker"], recs["worker2-pg"]) for s, recs in table.items()
             if "worker" in recs and "worker2-pg" in recs]
    if pairs:
        print("\nTWO WORKERS ON POSTGRESQL vs ONE WORKER ON SQLITE (same files, same sitting; each worker its own "
              "storescu association, half the files):")
        for syntax, one, two in pairs:
            e2e = (f"{two.e2e_rate / one.e2e_rate:.2f}" if two.e2e_rate and one.e2e_rate else "-")
            print(f"  {SYNTAX_LABEL[syntax]:<32} ingest {one.ingest_rate:.1f} -> {two.ingest_rate:.1f} studies/s "
                  f"(ratio {two.ingest_rate / one.ingest_rate:.2f}); end-to-end {fmt(one.e2e_rate)} -> "
                  f"{fmt(two.e2e_rate)} studies/s (ratio {e2e})")
    if verdicts:
        print("\nTARGETS (this machine):")
        for what, ok, value in verdicts:
            print(f"  [{'PASS' if ok else 'FAIL'}] {what}: {value}")
    if busy:
        print("WARNING: measured while other heavy processes ran; NOT valid measurements.")
    if args.json:
        args.json.write_text(json.dumps({
            "n": args.n, "repeats": args.repeats, "quiet": args.quiet, "quick": args.quick, "busy": busy,
            "results": {s: {k: {**asdict(v), "ingest_rate": v.ingest_rate, "mbps": v.mbps, "e2e_rate": v.e2e_rate}
                            for k, v in recs.items()} for s, recs in table.items()},
            "verdicts": [{"target": w, "pass": ok, "value": v} for w, ok, v in verdicts]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
