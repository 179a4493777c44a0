"""A SOP class the peer does not accept is reported as such, per file (issue 15, item 13), against
the real worker listener, which accepts only the image classes it scores (worker/net/listener.py)."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, Comprehensive3DSRStorage

from testkit.dicom_factory import make_file, synthetic_radiograph
from testkit.env import free_port
from worker.net import install
from worker.net.listener import Listener, Receiver
from worker.net.scu import store_files
from worker.settings import load_settings
from worker.store.db import Database
from worker.store.spool import Spool

SR_NAME = UID(Comprehensive3DSRStorage).name  # "Comprehensive 3D SR Storage"


@pytest.fixture
def worker_port(tmp_path):
    port = free_port()
    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path / "data"}"',
                                      "CXR_WORKER__NETWORK__PORT": str(port),
                                      "CXR_WORKER__NETWORK__BIND_ADDRESS": '"127.0.0.1"'})
    spool = Spool(settings.storage.data_dir)
    install(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=spool.incoming)
    database = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
    listener = Listener(settings, Receiver(settings, database, spool))
    try:
        yield listener.start()
    finally:
        listener.stop(grace=2.0)
        database.dispose()


def _sr_file(tmp_path):
    return make_file(tmp_path / "sr.dcm", synthetic_radiograph(32, 32), sop_class=Comprehensive3DSRStorage)


def test_a_sop_class_the_peer_does_not_take_is_named(worker_port, tmp_path):
    [outcome] = store_files([_sr_file(tmp_path)], "127.0.0.1", worker_port, "CXR_WORKER", timeout=10)
    assert not outcome.ok and outcome.status is None
    assert f"accepted no presentation context for {SR_NAME} ({Comprehensive3DSRStorage})" in outcome.error
    assert "Explicit VR Little Endian" in outcome.error and "abstract syntax not supported" in outcome.error
    assert "aborted" not in outcome.error and "connection lost" not in outcome.error


def test_in_a_mixed_batch_only_the_refused_class_fails_and_says_why(worker_port, tmp_path):
    image = make_file(tmp_path / "dx.dcm", synthetic_radiograph(64, 64))
    stored, refused = store_files([image, _sr_file(tmp_path)], "127.0.0.1", worker_port, "CXR_WORKER", timeout=10)
    assert stored.ok, stored
    assert not refused.ok and refused.status is None
    assert f"accepted no presentation context for {SR_NAME}" in refused.error
