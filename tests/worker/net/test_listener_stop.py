"""Listener.stop(): established associations may finish; bare TCP connections do not hold the stop."""

from __future__ import annotations

import socket
import tempfile
import time

import pytest
from testkit.env import free_port
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from worker.net import install
from worker.net._pynetdicom.server import NoDelayServer
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


def _wait(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()


def _closed_by_peer(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


NO_THREAD_DIES = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@NO_THREAD_DIES
def test_a_silent_tcp_connection_does_not_hold_the_stop(tmp_path):
    """A connection that never sends an A-ASSOCIATE-RQ is pending in the server (no Association,
    not counted against max_associations); stop() closes it at once, and no thread dies."""
    listener, port, database = _listener(tmp_path)
    probe = socket.create_connection(("127.0.0.1", port))  # connects, never sends an A-ASSOCIATE-RQ
    try:
        server = listener.server
        assert _wait(lambda: server.pending_connections == 1), "the probe never reached its thread"
        assert not server.active_associations  # nothing counts against max_associations
        started = time.monotonic()
        listener.stop(grace=30.0)
        assert time.monotonic() - started < 3.0  # acse_timeout is 30 s
        assert _closed_by_peer(probe)
        assert _wait(lambda: server.pending_connections == 0)
    finally:
        probe.close()
        database.dispose()


@NO_THREAD_DIES
def test_an_association_awaiting_its_request_is_closed_as_its_state_allows(tmp_path, monkeypatch):
    """An acceptor Association in Sta2 (transport open, no A-ASSOCIATE-RQ yet). The server now hands
    a connection over only with its request in the buffer, so Sta2 lasts microseconds; to hold
    one, this listener hands the silent probe over at once, as pynetdicom's own server does.
    stop() closes it by shutting the transport down (Evt17, AA-5); an A-ABORT request (Evt15)
    killed the reactor thread with InvalidEventError ('Evt15' for the current state 'Sta2')."""
    monkeypatch.setattr(NoDelayServer, "_await_association_request", lambda self, request, address: True)
    listener, port, database = _listener(tmp_path)
    probe = socket.create_connection(("127.0.0.1", port))  # never sends anything
    try:
        server = listener.server
        assocs = _wait(lambda: server.active_associations)
        assert assocs, "the connection was not handed to pynetdicom"
        assert _wait(lambda: assocs[0].dul.state_machine.current_state == "Sta2"), \
            assocs[0].dul.state_machine.current_state
        started = time.monotonic()
        listener.stop(grace=30.0)
        assert time.monotonic() - started < 3.0
        assert _closed_by_peer(probe)
        assert _wait(lambda: not assocs[0].is_alive()), "the reactor did not end"
        assert assocs[0].dul.state_machine.current_state == "Sta1"
    finally:
        probe.close()
        database.dispose()


@NO_THREAD_DIES
def test_a_first_pdu_cut_short_does_not_hold_the_stop(tmp_path):
    """One byte of a PDU that is not a request hands the connection to pynetdicom, whose reactor
    then waits for the rest of the header (still Sta1, its Evt5 queued): stop() closes it too."""
    listener, port, database = _listener(tmp_path)
    probe = socket.create_connection(("127.0.0.1", port))
    try:
        probe.sendall(b"\x04")  # the first byte of a P-DATA-TF header, and nothing more
        server = listener.server
        assocs = _wait(lambda: server.active_associations)
        assert assocs, "the connection was not handed to pynetdicom"
        started = time.monotonic()
        listener.stop(grace=30.0)
        assert time.monotonic() - started < 3.0
        assert _closed_by_peer(probe)
        assert _wait(lambda: not assocs[0].is_alive()), "the reactor did not end"
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
