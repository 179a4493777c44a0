"""Connections without an A-ASSOCIATE-RQ yet are pending in the server (worker/net/_pynetdicom/server.py):
they count against no association limit, have network.association_request_timeout to send it, and at
most network.max_pending_connections of them are kept (a new one closes the oldest)."""

from __future__ import annotations

import socket
import time

import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation

from testkit.env import free_port
from worker.net import install
from worker.net.listener import Listener, Receiver
from worker.settings import load_settings
from worker.store.db import Database
from worker.store.spool import Spool

NO_THREAD_DIES = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
pytestmark = NO_THREAD_DIES


@pytest.fixture
def make_listener(tmp_path):
    made = []

    def make(**network):
        port = free_port()
        environ = {"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path}"', "CXR_WORKER__NETWORK__PORT": str(port),
                   "CXR_WORKER__NETWORK__BIND_ADDRESS": '"127.0.0.1"'}
        environ.update({f"CXR_WORKER__NETWORK__{k.upper()}": str(v) for k, v in network.items()})
        settings = load_settings(environ=environ)
        spool = Spool(settings.storage.data_dir)
        install(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=spool.incoming)
        database = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
        listener = Listener(settings, Receiver(settings, database, spool))
        made.append((listener, database))
        return listener, listener.start()

    yield make
    for listener, database in made:
        listener.stop(grace=2.0)
        database.dispose()


def _wait(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _echo(port: int) -> int:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
    try:
        assert assoc.is_established, "association not established"
        return assoc.send_c_echo().Status
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_silent_connections_count_against_no_association_limit(make_listener):
    listener, port = make_listener(max_associations=2)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    try:
        assert _wait(lambda: listener.server.pending_connections == 10)
        assert not listener.server.active_associations
        assert _echo(port) == 0x0000
        assert _echo(port) == 0x0000
        assert listener.server.pending_connections == 10  # still held: they were not what gave way
    finally:
        for sock in idle:
            sock.close()


def test_a_silent_connection_is_closed_after_the_request_timeout(make_listener):
    listener, port = make_listener(association_request_timeout=1.0)
    started = time.monotonic()
    probe = socket.create_connection(("127.0.0.1", port))
    try:
        assert _closed(probe, timeout=5.0)
        assert 0.8 <= time.monotonic() - started < 4.0
        assert _wait(lambda: listener.server.pending_connections == 0)
    finally:
        probe.close()


def test_beyond_max_pending_the_oldest_silent_connection_is_closed(make_listener):
    listener, port = make_listener(max_pending_connections=4)
    first = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        assert _wait(lambda: listener.server.pending_connections == 4)
        later = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert _closed(first[0], 2.0) and _closed(first[1], 2.0)  # the two oldest made room
        assert not _closed(first[2], 0.2) and not _closed(later[1], 0.2)
        assert _echo(port) == 0x0000  # a real sender always gets in (it closes the next oldest)
        for sock in later:
            sock.close()
    finally:
        for sock in first:
            sock.close()


def test_a_request_sent_slowly_within_the_timeout_is_served(make_listener):
    listener, port = make_listener(association_request_timeout=3.0)
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "SLOW"
    primitive.called_ae_title = "CXR_WORKER"
    primitive.calling_presentation_address = AddressInformation.from_tuple(("127.0.0.1", 0))
    primitive.called_presentation_address = AddressInformation.from_tuple(("127.0.0.1", port))
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = pdu.encode()
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        for i in range(0, len(data), 16):  # 16 bytes every 20 ms: the header, then the rest
            sock.sendall(data[i:i + 16])
            time.sleep(0.02)
        sock.settimeout(5.0)
        answer = sock.recv(1)
        assert answer == b"\x02", f"expected an A-ASSOCIATE-AC, got {answer!r}"
    finally:
        sock.close()
