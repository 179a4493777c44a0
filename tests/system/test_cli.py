"""`cxr-worker` as a new user meets it: real processes, real sockets, real SQLite (issue 15).

Start-up problems exit with 2 and one line naming the setting or flag and the file (no traceback);
read-only commands never create a database; `serve --port/--bind/--data-dir` win over the
configuration; a busy port is reported before the model loads; `send --wrap` is idempotent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from testkit.env import REPO_ROOT, free_port
from testkit.worker_process import WorkerProcess, db_rows


def cli(*args: str, cwd: Path | str = REPO_ROOT, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`cxr-worker ARGS` as a subprocess, without any CXR_WORKER__ variable of the test's own environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_WORKER__")}
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess, code: int = 2) -> str:
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["results", "status"])
def test_read_only_commands_never_create_a_database(tmp_path, command):
    line = one_line_error(cli(command, cwd=tmp_path))
    assert f"no worker database at {tmp_path / 'var' / 'cxr-worker' / 'worker.db'}" in line
    assert "storage.data_dir" in line and "--data-dir" in line and "CXR_WORKER__STORAGE__DATA_DIR" in line
    assert list(tmp_path.iterdir()) == []  # not even the directory
    elsewhere = tmp_path / "elsewhere"
    line = one_line_error(cli(command, "--data-dir", str(elsewhere), cwd=tmp_path))
    assert str(elsewhere / "worker.db") in line and not elsewhere.exists()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_configuration_errors_name_the_key_the_source_and_the_variable(tmp_path):
    cases = [
        ({"CXR_WORKER__NETWORK__PROT": "1"}, None,
         ["network.prot: unknown key", "did you mean 'port'", "CXR_WORKER__NETWORK__PROT"]),
        ({}, write(tmp_path / "site.toml", "[network]\nprot = 1\n"),
         ["network.prot: unknown key", "site.toml", "CXR_WORKER__NETWORK__PROT"]),
        ({}, write(tmp_path / "broken.toml", "[network]\nport = 11112\n\n[[destinations]\nname = 'x'\n"),
         ["broken.toml: TOML syntax error", "line 4"]),
        ({"CXR_WORKER__DESTINATIONS": '[{"name": "pacs", "host": "h", "port": 104, "ae_title": "PACS"}]'}, None,
         ["CXR_WORKER__DESTINATIONS: TOML syntax error"]),
        ({"CXR_WORKER__DESTINATIONS": '[{name = "pacs", port = 104}]'}, None,
         ["destinations[0] ('pacs'): missing keys host, ae_title"]),
        ({"CXR_WORKER__DESTINATIONS": '[{name = "pacs", host = "h", port = 104, ae_title = "P", aet = "X"}]'}, None,
         ["destinations[0] ('pacs').aet: unknown key"]),
        ({"CXR_WORKER__NETWORK__PORT": "70000"}, None, ["network.port: 70000 > 65535"]),
        ({}, tmp_path / "nothere.toml", ["nothere.toml (--config): no such file"]),
    ]
    for env, site, expected in cases:
        run = cli("results", *(["--config", str(site)] if site else []), cwd=tmp_path, env=env)
        line = one_line_error(run)
        for text in expected:
            assert text in line, (env, site, line)
        assert "expected a list of tables" not in line and "__init__()" not in line
    assert not (tmp_path / "var").exists()


def test_a_model_file_that_is_missing_or_not_a_checkpoint_is_named(tmp_path):
    film = tmp_path / "film.png"
    cv2.imwrite(str(film), np.full((64, 48), 128, np.uint8))
    line = one_line_error(cli("classify", "--model", "README.md", str(film)))
    assert line.startswith("cxr-worker classify: --model: README.md is not a cxr-worker model checkpoint")
    line = one_line_error(cli("classify", str(film), env={"CXR_WORKER__MODEL__PATH": '"/no/such.safetensors"'}))
    assert "model.path: no such model file: /no/such.safetensors" in line
    run = cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
              env={"CXR_WORKER__MODEL__PATH": '"/no/such.safetensors"'})
    assert "model.path: no such model file: /no/such.safetensors" in one_line_error(run)
    assert not (tmp_path / "data").exists()  # stopped before the service was built


def test_a_busy_port_is_one_line_naming_it_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        run = cli("serve", "--bind", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "data"))
        elapsed = time.monotonic() - started
    line = one_line_error(run)
    assert f"network.port: port {port} is already in use" in line and "--port" in line
    assert "CXR_WORKER__NETWORK__PORT" in line
    # before the service: no data directory, no model log line (the model loads after both)
    assert not (tmp_path / "data").exists() and "cxr_worker.scoring" not in run.stdout + run.stderr
    print(f"busy port reported after {elapsed:.2f} s")


def test_send_of_a_file_that_is_not_dicom_says_so(tmp_path):
    port = free_port()  # nothing listens: the file is refused before any association
    run = cli("send", "--port", str(port), "--timeout", "3", "README.md")
    assert run.returncode == 1
    assert "README.md: not a DICOM file" in run.stderr and "--wrap" in run.stderr
    assert "force=True" not in run.stderr and "Traceback" not in run.stderr
    assert "sent 0, failed 1" in run.stdout


def test_a_failed_send_does_not_end_at_100_percent(tmp_path):
    film = tmp_path / "film.png"
    cv2.imwrite(str(film), np.full((64, 48), 128, np.uint8))
    run = cli("send", "--wrap", "--port", str(free_port()), "--timeout", "3", str(film))  # progress bar on
    assert run.returncode == 1 and "sent 0, failed 1" in run.stdout
    assert "0/1" in run.stderr and "100%" not in run.stderr and "1/1" not in run.stderr
    assert "failed=1" in run.stderr


class FlagWorker(WorkerProcess):
    """`cxr-worker serve --port P --bind 127.0.0.1 --data-dir D`, the environment pointing elsewhere:
    the flags must win."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env["CXR_WORKER__NETWORK__PORT"] = str(free_port())       # not where it must listen
        self.env["CXR_WORKER__NETWORK__BIND_ADDRESS"] = '"0.0.0.0"'
        self.env["CXR_WORKER__STORAGE__DATA_DIR"] = str(self.data_dir.parent / "not-here")

    def serve_args(self) -> list[str]:
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--data-dir", str(self.data_dir)]


def test_serve_flags_win_and_send_wrap_is_idempotent(tmp_path, kaggle_jpegs):
    film = kaggle_jpegs["NORMAL"][0]
    copy = tmp_path / "renamed-copy.jpeg"  # same bytes, other name: the same instance
    copy.write_bytes(film.read_bytes())
    data = tmp_path / "data"
    with FlagWorker(data) as worker:
        assert not (tmp_path / "not-here").exists()
        peer = ["--port", str(worker.port), "--aec", worker.ae_title, "--no-progress"]
        for path in (film, film, copy):
            run = cli("send", "--wrap", *peer, str(path))
            assert run.returncode == 0 and "sent 1, failed 0" in run.stdout, run.stderr
        counts = lambda: db_rows(data, "SELECT (SELECT COUNT(*) FROM studies), (SELECT COUNT(*) FROM instances)")[0]
        assert counts() == (1, 1)
        run = cli("send", "--wrap", "--new-study", *peer, str(film), str(film))
        assert run.returncode == 0 and "sent 2, failed 0" in run.stdout, run.stderr
        assert counts() == (3, 3)
        run = cli("send", "--new-study", *peer, str(film))  # --new-study is for --wrap only
        assert run.returncode == 2 and "--wrap" in run.stderr
        assert "listening as CXR_WORKER on 127.0.0.1:" + str(worker.port) in worker.log()
