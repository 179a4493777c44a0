"""The HTTP face of a real `cxr-worker serve` on loopback: health, readiness, Prometheus metrics, the
pages in headless Chromium, the disk watermark on a really filled filesystem, a database that goes away.

DCMTK storescu sends the studies; metrics are parsed with prometheus_client's parser and must move by
exactly what was sent.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess

import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from testkit.env import require_tool
from testkit.postgres import postgres_server
from testkit.worker_process import WorkerProcess, partial_receptions, storescu, wrap_jpeg

pytestmark = pytest.mark.dcmtk

PHI_NAME = "Zyxwvut^Phiname"
PHI_ID = "PHIID-424242"
#: A child's birth date (3 years ago): inside the shipped model's intended use (1-5 years), so scored.
PHI_BIRTH = (datetime.date.today() - datetime.timedelta(days=3 * 365)).strftime("%Y%m%d")
PHI_STRINGS = ("Zyxwvut", "Phiname", PHI_ID, PHI_BIRTH)
READY_CHECKS = {"database", "disk", "model", "listener", "scorer", "outbox"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory, destination):
    root = tmp_path_factory.mktemp("http")
    env = {"CXR_WORKER__MODEL__DECODE_PROCESSES": "true",  # metrics must stay right with decode processes
           "CXR_WORKER__HTTP__REFRESH_SECONDS": "30"}
    with WorkerProcess(root / "data", destinations=[destination.destination()], env=env) as proc:
        yield proc
    assert proc.process.returncode == 0, proc.log()[-3000:]


def value(metrics: dict, sample: str, /, **labels) -> float:
    return metrics.get((sample, tuple(sorted(labels.items()))), 0.0)


def total(metrics: dict, name: str) -> float:
    """Sum of a sample over all its label values."""
    return sum(v for (n, _), v in metrics.items() if n == name)


def results_for(worker: WorkerProcess, study_uids: list[str], delivered: int = 0) -> dict[str, dict]:
    def ready():
        rows = {r["study_uid"]: r for r in worker.results() if r["study_uid"] in study_uids}
        if len(rows) == len(study_uids) and all(r["delivered"] >= delivered for r in rows.values()):
            return rows
        return None
    return worker.wait_for(ready, timeout=120, what=f"results for {study_uids}")


def chromium(*args: str) -> subprocess.CompletedProcess:
    require_tool("chromium")
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def dom(url: str) -> str:
    out = chromium("--dump-dom", url)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-2000:]
    return out.stdout


def test_healthz_and_readyz_name_every_check(worker):
    alive = worker.http_get("/healthz")
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}
    ready = worker.http_get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["failed"] == []
    assert set(body["checks"]) == READY_CHECKS and all(c["ok"] for c in body["checks"].values())


def test_metrics_move_by_exactly_what_was_sent(worker, destination, kaggle_jpegs, tmp_path):
    before = worker.metrics()
    a, b = generate_uid(), generate_uid()
    files = [wrap_jpeg(j, tmp_path / f"a{i}.dcm", study_uid=a) for i, j in enumerate(kaggle_jpegs["PNEUMONIA"][:2])]
    files.append(wrap_jpeg(kaggle_jpegs["NORMAL"][0], tmp_path / "b0.dcm", study_uid=b))
    files.append(wrap_jpeg(kaggle_jpegs["NORMAL"][1], tmp_path / "b1.dcm", study_uid=b, BodyPartExamined="HAND"))
    sent = storescu(worker.port, *files)
    assert sent.returncode == 0, sent.stderr
    rows = results_for(worker, [a, b], delivered=1)

    def delivered_twice():
        now = worker.metrics()
        return now if value(now, "cxr_worker_deliveries_total", destination="dest") - \
            value(before, "cxr_worker_deliveries_total", destination="dest") == 2 else None
    after = worker.wait_for(delivered_twice, what="two deliveries counted")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("cxr_worker_instances_received_total", outcome="stored", reason="") == 4
    assert delta("cxr_worker_studies_scored_total", status="done") == 2
    assert delta("cxr_worker_instances_declined_total", reason="body_part") == 1
    assert delta("cxr_worker_scoring_seconds_count") == 2
    assert delta("cxr_worker_end_to_end_seconds_count") == 2
    assert delta("cxr_worker_delivery_failures_total", destination="dest") == 0
    # decode time, recorded in the service process from what the decode processes returned
    syntax = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert delta("cxr_worker_decode_seconds_count", transfer_syntax=syntax) == 3
    assert total(after, "cxr_worker_decode_seconds_count") - total(before, "cxr_worker_decode_seconds_count") == 3
    # read from the database at scrape time
    assert value(after, "cxr_worker_database_up") == 1
    assert delta("cxr_worker_studies", state="done") == 2
    assert delta("cxr_worker_outbox_items", destination="dest", state="sent") == 2
    assert value(after, "cxr_worker_outbox_oldest_waiting_seconds", destination="dest") == 0
    model = rows[a]
    assert value(after, "cxr_worker_model_info", name=model["model_name"], version=model["model_version"],
                 uid=model["model_uid"]) == 1
    assert value(after, "cxr_worker_spool_below_watermark") == 0 and value(after, "cxr_worker_spool_free_bytes") > 0

    again = storescu(worker.port, *files)  # the same instances: duplicates, nothing stored
    assert again.returncode == 0, again.stderr
    resent = worker.metrics()
    assert value(resent, "cxr_worker_instances_received_total", outcome="duplicate", reason="") - \
        value(after, "cxr_worker_instances_received_total", outcome="duplicate", reason="") == 4
    assert value(resent, "cxr_worker_instances_received_total", outcome="stored", reason="") == \
        value(after, "cxr_worker_instances_received_total", outcome="stored", reason="")


def test_page_in_chromium_shows_rows_and_images_and_no_patient_data(worker, kaggle_jpegs, tmp_path):
    study = generate_uid()
    files = [wrap_jpeg(j, tmp_path / f"{i}.dcm", study_uid=study, patient_name=PHI_NAME, patient_id=PHI_ID,
                       PatientBirthDate=PHI_BIRTH, AccessionNumber="HTTPACC1")
             for i, j in enumerate(kaggle_jpegs["PNEUMONIA"][2:4])]
    assert storescu(worker.port, *files).returncode == 0
    row = results_for(worker, [study])[study]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    # a heatmap where the scorer writes them: the study page shows the overlay found there
    # (this worker makes no heatmaps: tests/system/test_heatmaps.py checks the real ones are written here)
    heatmap = worker.data_dir / "heatmaps" / study / f"{sops[0]}.jpg"
    heatmap.parent.mkdir(parents=True)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(heatmap, format="JPEG")

    index = dom(worker.http_url + "/")
    assert f'data-study-uid="{study}"' in index and "HTTPACC1" in index
    assert '<meta http-equiv="refresh" content="30">' in index
    assert f"{row['probability']:.3f}" in index
    study_page = dom(f"{worker.http_url}/studies/{study}")
    for sop in sops:
        assert f'data-sop-uid="{sop}"' in study_page
    # the browser loaded every image: 2 thumbnails (224x224 Kaggle films) and the heatmap
    assert 'data-images-shown="3"' in study_page, study_page[-3000:]
    assert study_page.count('class="thumbnail"') == 2 and 'data-loaded="224x224"' in study_page
    assert 'class="heatmap"' in study_page and 'data-loaded="64x48"' in study_page
    for page in (index, study_page):
        for phi in PHI_STRINGS:
            assert phi not in page
    shot = tmp_path / "page.png"
    out = chromium("--window-size=1100,700", f"--screenshot={shot}", f"{worker.http_url}/studies/{study}")
    assert out.returncode == 0, out.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1100, 700)
        assert len(image.convert("L").getcolors(256) or range(257)) > 16  # a rendered page with a film, not a blank one


def test_patient_data_shown_only_when_turned_on_and_the_token_guards_all_but_healthz(tmp_path, kaggle_jpegs):
    env = {"CXR_WORKER__HTTP__SHOW_PATIENT_DATA": "true", "CXR_WORKER__HTTP__BEARER_TOKEN": "s3cret-token",
           "CXR_WORKER__MODEL__DECODE_PROCESSES": "false"}
    study = generate_uid()
    file = wrap_jpeg(kaggle_jpegs["NORMAL"][2], tmp_path / "p.dcm", study_uid=study, patient_name=PHI_NAME,
                     patient_id=PHI_ID, PatientBirthDate=PHI_BIRTH)
    with WorkerProcess(tmp_path / "data", env=env) as worker:
        assert worker.http_get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/", f"/studies/{study}"):
            assert worker.http_get(path).status_code == 401
            assert worker.http_get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert worker.http_get("/readyz", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert storescu(worker.port, file).returncode == 0
        results_for(worker, [study])
        index = dom(worker.http_url + "/?token=s3cret-token")
        assert PHI_NAME in index and PHI_ID in index and PHI_BIRTH in index
        assert f'href="/studies/{study}?token=s3cret-token"' in index
        page = dom(f"{worker.http_url}/studies/{study}?token=s3cret-token")
        assert PHI_NAME in page and 'data-images-shown="1"' in page
    assert worker.process.returncode == 0


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 MiB tmpfs where root may mount one (CI, this container), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_watermark_refuses_with_a700_keeps_nothing_and_recovers_without_restart(tmp_path, kaggle_jpegs,
                                                                                     small_filesystem):
    """A real filesystem really filled: a 64 MiB tmpfs with min_free_bytes = 32 MiB and a 40 MiB file
    allocated on it; where no tmpfs can be mounted, the data directory's own filesystem with min_free_bytes
    1.5 GB below its free space now and a 3 GB file (posix_fallocate) taking free space below that."""
    if small_filesystem is not None:
        data_dir = small_filesystem / "data"
        data_dir.mkdir()
        min_free, fill = 32 << 20, 40 << 20
    else:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        st = os.statvfs(data_dir)
        free = st.f_bavail * st.f_frsize
        margin = 1_500_000_000
        if free < 3 * margin:
            pytest.skip(f"only {free} bytes free")
        min_free, fill = free - margin, 2 * margin
    print(f"watermark test on {'a 64 MiB tmpfs' if small_filesystem is not None else 'the data filesystem'}")
    env = {"CXR_WORKER__STORAGE__MIN_FREE_BYTES": str(min_free), "CXR_WORKER__MODEL__DECODE_PROCESSES": "false"}
    first = wrap_jpeg(kaggle_jpegs["NORMAL"][3], tmp_path / "refused.dcm", study_uid=generate_uid())
    filler = data_dir / "filler"
    with WorkerProcess(data_dir, env=env) as worker:
        assert worker.http_get("/readyz").status_code == 200
        try:
            fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                os.posix_fallocate(fd, 0, fill)
            finally:
                os.close(fd)
            low = worker.wait_for(lambda: (r := worker.http_get("/readyz")).status_code == 503 and r.json(),
                                  timeout=30, what="/readyz 503")
            assert low["failed"] == ["disk"] and "min_free_bytes" in low["checks"]["disk"]["detail"]
            refused = storescu(worker.port, first, options=("-v",))
            output = (refused.stdout + refused.stderr).lower()
            assert "received store response (refused: outofresources)" in output, output  # DCMTK's words for 0xA700
            assert "nothing of it written" in worker.log()  # refused as it began to arrive: no byte written
            # nothing kept: no spooled bytes, no spool file, no row
            assert partial_receptions(data_dir) == []
            assert [p for p in (data_dir / "spool").rglob("*") if p.is_file()] == []
            assert worker.db_rows("SELECT count(*) FROM instances") == [(0,)]
            metrics = worker.metrics()
            assert value(metrics, "cxr_worker_instances_received_total", outcome="refused",
                         reason="disk_below_watermark") == 1
            assert value(metrics, "cxr_worker_spool_below_watermark") == 1
            assert value(metrics, "cxr_worker_instances_received_total", outcome="stored", reason="") == 0
        finally:
            filler.unlink(missing_ok=True)
        worker.wait_for(lambda: worker.http_get("/readyz").status_code == 200, timeout=30, what="/readyz 200")
        accepted = storescu(worker.port, first, options=("-v",))  # the same sender retries: stored now, no restart
        assert accepted.returncode == 0 and "received store response (success)" in (accepted.stdout +
                                                                                    accepted.stderr).lower()
        assert worker.db_rows("SELECT count(*) FROM instances") == [(1,)]
        assert value(worker.metrics(), "cxr_worker_spool_below_watermark") == 0
    assert worker.process.returncode == 0


@pytest.fixture
def postgres():
    yield from postgres_server()


def test_readiness_fails_while_the_database_is_gone_and_returns_with_it(tmp_path, postgres):
    env = {"CXR_WORKER__STORAGE__DATABASE_URL": postgres.url, "CXR_WORKER__MODEL__DECODE_PROCESSES": "false"}
    with WorkerProcess(tmp_path / "data", env=env) as worker:
        assert worker.http_get("/readyz").status_code == 200
        postgres.stop()
        try:
            gone = worker.wait_for(lambda: (r := worker.http_get("/readyz")).status_code == 503 and r.json(),
                                   timeout=30, what="/readyz 503")
            assert gone["failed"] == ["database"] and "unreachable" in gone["checks"]["database"]["detail"]
            assert worker.http_get("/healthz").status_code == 200  # alive all the same
            assert value(worker.metrics(), "cxr_worker_database_up") == 0
        finally:
            postgres.start()
        worker.wait_for(lambda: worker.http_get("/readyz").status_code == 200, timeout=60, what="/readyz 200")
        assert value(worker.metrics(), "cxr_worker_database_up") == 1


def test_a_busy_http_port_is_one_line_naming_http_port_before_the_model_loads(tmp_path):
    import socket
    import sys

    from testkit.env import REPO_ROOT, free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_WORKER__")}
        env.update({"CXR_WORKER__HTTP__PORT": str(port), "CXR_WORKER__NETWORK__PORT": str(free_port()),
                    "CXR_WORKER__NETWORK__BIND_ADDRESS": "127.0.0.1"})
        run = subprocess.run([sys.executable, "-m", "worker", "serve", "--data-dir", str(tmp_path / "data")],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"http.port: cannot listen on 127.0.0.1:{port}" in lines[0], run.stderr
    assert "CXR_WORKER__HTTP__PORT" in lines[0] and "--http-port" in lines[0]
    assert not (tmp_path / "data").exists()  # before the service: nothing created, no model loaded


def test_https_with_the_tls_certificate_of_the_listener(tmp_path):
    import ssl

    import httpx

    from testkit.pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    env = {"CXR_WORKER__HTTP__TLS": "true", "CXR_WORKER__TLS__CERTIFICATE": str(pki["server.crt"]),
           "CXR_WORKER__TLS__PRIVATE_KEY": str(pki["server.key"]), "CXR_WORKER__MODEL__DECODE_PROCESSES": "false"}
    with WorkerProcess(tmp_path / "data", env=env) as worker:  # DICOM stays plain (tls.enabled = false)
        url = f"https://127.0.0.1:{worker.http_port}"
        ready = httpx.get(url + "/readyz", verify=ssl.create_default_context(cafile=str(pki["ca.crt"])), timeout=30)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            httpx.get(f"http://127.0.0.1:{worker.http_port}/healthz", timeout=10).raise_for_status()
    assert worker.process.returncode == 0


def test_http_enabled_false_serves_dicom_without_an_http_port(tmp_path):
    import httpx

    env = {"CXR_WORKER__HTTP__ENABLED": "false", "CXR_WORKER__MODEL__DECODE_PROCESSES": "false"}
    with WorkerProcess(tmp_path / "data", env=env) as worker:
        assert worker.echo()
        with pytest.raises(httpx.ConnectError):
            worker.http_get("/healthz", timeout=5)
        assert "HTTP on" not in worker.log()
    assert worker.process.returncode == 0
