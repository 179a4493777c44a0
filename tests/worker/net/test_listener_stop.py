"""Listener.stop(): established associations may finish; bare TCP connections do not hold the stop."""

from __future__ import annotations

import socket
import tempfile
import time

from testkit.env import free_port
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from worker.net import install
from worker.store.db import Database
from worker.net.listener import Listener, Receiver
from worker.settings import load_settings
from worker.store.spool import Spool


def _listener(tmp_path):
    port = free_port()
    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path}"',
                                      "CXR_WORKER__NETWORK__PORT": str(port),
                                      "CXR_WORKER__NETWORK__BIND_ADDRESS": '"127.0.0.1"'})
    spool = Spool(settings.storage.data_dir)
    install(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=spool.incoming)  # as the service does
    database = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
    listener = Listener(settings, Receiver(settings, database, spool))
    return listener, listener.start(), database


def test_a_silent_tcp_connection_does_not_hold_the_stop(tmp_path):
    listener, port, database = _listener(tmp_path)
    probe = socket.create_connection(("127.0.0.1", port))  # connects, never sends an A-ASSOCIATE-RQ
    try:
        deadline = time.monotonic() + 5
        while not listener.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.server.active_associations, "the probe never reached an acceptor thread"
        started = time.monotonic()
        listener.stop(grace=30.0)
        assert time.monotonic() - started < 3.0  # acse_timeout is 30 s
    finally:
        probe.close()
        database.dispose()


def test_the_listener_leaves_the_process_temp_dir_alone(tmp_path):
    """pynetdicom spools into the spool's incoming/ without changing tempfile's default for the
    whole process (other code, e.g. a PostgreSQL test cluster, must not land in a 0700 spool)."""
    before = tempfile.gettempdir()
    listener, port, database = _listener(tmp_path)
    try:
        assert tempfile.gettempdir() == before
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=listener.settings.network.ae_title)
        assert assoc.is_established
        assoc.release()
    finally:
        listener.stop(grace=5.0)
        database.dispose()


def test_an_established_association_is_given_its_grace(tmp_path):
    listener, port, database = _listener(tmp_path)
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=listener.settings.network.ae_title)
    try:
        assert assoc.is_established
        started = time.monotonic()
        listener.stop(grace=1.0)  # the peer keeps it open: aborted only after the grace
        assert time.monotonic() - started >= 0.9
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.release()
        database.dispose()
