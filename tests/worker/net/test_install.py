"""worker.net.install(): the one switch for pynetdicom's process-wide changes, and its version check."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pynetdicom
import pytest
from pynetdicom import _config, dimse_messages
from pynetdicom.transport import AssociationSocket

from testkit.env import REPO_ROOT
from worker.errors import UnsupportedDependency
from worker.net import install
from worker.net._pynetdicom import SUPPORTED_MINORS, check_version, recv, spool_file
from worker.net.listener import Listener, Receiver
from worker.settings import load_settings
from worker.store.db import Database
from worker.store.spool import Spool

_FLAGS = ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "LOG_REQUEST_IDENTIFIERS",
          "LOG_RESPONSE_IDENTIFIERS")
#: pynetdicom's own state: its defaults, and its own methods and spool-file factory.
PRISTINE = {"STORE_RECV_CHUNKED_DATASET": False, "STORE_SEND_CHUNKED_DATASET": False,
            "LOG_REQUEST_IDENTIFIERS": True, "LOG_RESPONSE_IDENTIFIERS": True,
            "AssociationSocket.recv": recv._original_recv, "NamedTemporaryFile": tempfile.NamedTemporaryFile}


def pynetdicom_globals() -> dict:
    """Everything install() may change in pynetdicom, as it is now."""
    state = {flag: getattr(_config, flag) for flag in _FLAGS}
    state["AssociationSocket.recv"] = AssociationSocket.recv
    state["NamedTemporaryFile"] = dimse_messages.NamedTemporaryFile
    return state


def _set(state: dict) -> None:
    for flag in _FLAGS:
        setattr(_config, flag, state[flag])
    AssociationSocket.recv = state["AssociationSocket.recv"]
    dimse_messages.NamedTemporaryFile = state["NamedTemporaryFile"]


@pytest.fixture
def pristine_pynetdicom():
    """pynetdicom as imported (whatever earlier tests installed), put back afterwards."""
    before = pynetdicom_globals()
    _set(PRISTINE)
    try:
        yield
    finally:
        _set(before)


def test_constructing_a_listener_changes_no_pynetdicom_global(pristine_pynetdicom, tmp_path):
    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path}"'})
    spool = Spool(settings.storage.data_dir)
    database = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
    try:
        Listener(settings, Receiver(settings, database, spool))
        assert pynetdicom_globals() == PRISTINE
        install(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=spool.incoming)
        after = pynetdicom_globals()
        assert {key for key in PRISTINE if after[key] != PRISTINE[key]} == set(PRISTINE)  # install() did it all
        assert after["AssociationSocket.recv"] is recv._recv
        assert after["NamedTemporaryFile"] is spool_file.IncomingFile
        assert spool_file._directory == os.fspath(spool.incoming)
    finally:
        database.dispose()


def test_the_installed_pynetdicom_is_supported():
    check_version(pynetdicom.__version__)
    for version in ("3.0.0", "3.0.4", "3.0.5", "3.0.5.dev0", "3.0"):
        check_version(version, ("3.0",))


@pytest.mark.parametrize("version", ["3.1.0", "3.1.0rc1", "2.1.1", "4.0.0", "3.10.0", "30.0.1", "unknown", ""])
def test_an_unsupported_pynetdicom_is_refused_with_both_versions_named(version):
    with pytest.raises(UnsupportedDependency) as refused:
        check_version(version, ("3.0",))
    message = str(refused.value)
    assert f"pynetdicom {version} is installed" in message
    assert "supports pynetdicom 3.0.x only" in message and "'pynetdicom>=3.0.4,<3.1'" in message


def test_supported_minors_match_the_pin_in_pyproject():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert SUPPORTED_MINORS == ("3.0",) and '"pynetdicom>=3.0.4,<3.1"' in pyproject


def test_serve_refuses_an_unsupported_pynetdicom_in_one_line_exit_2(tmp_path):
    """The real CLI and service in a fresh process; the installed pynetdicom only claims another version."""
    code = ("import sys, pynetdicom; pynetdicom.__version__ = '3.1.0'\n"
            "from worker.cli.main import main\n"
            "sys.exit(main(['serve']))\n")
    env = dict(os.environ, CXR_WORKER__STORAGE__DATA_DIR=f'"{tmp_path / "data"}"')
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("cxr-worker: pynetdicom 3.1.0 is installed"), run.stderr
    assert not (tmp_path / "data" / "worker.db").exists()  # stopped before the database and the model
