"""worker/net/dicomweb.stow_files: the request it sends and how it reads each kind of STOW-RS answer.

Orthanc (tests/system/test_stow.py) answers 200 with a Referenced SOP Sequence and cannot be made to
answer 202/409 with a Failed SOP Sequence, so here a real HTTP server on loopback (http.server)
records the request and answers what PS3.18 allows.
"""

from __future__ import annotations

import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from worker.net.dicomweb import auth_for, make_client, stow_files

FILES = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
UIDS = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in FILES]


class _Peer:
    """A loopback HTTP server answering each POST with the next (status, body) of ``answers``."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict | None]] = []
        self.requests: list[tuple[str, dict, bytes]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                peer.requests.append((self.path, dict(self.headers), body))
                code, answer = peer.answers.pop(0)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicomweb"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def peer():
    p = _Peer()
    yield p
    p.close()


def _ref(uid: str, reason: int | None = None) -> dict:
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _response(stored=(), failed=()) -> dict:
    answer = {}
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": [_ref(u) for u in stored]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": [_ref(u, r) for u, r in failed]}
    return answer


def test_request_is_multipart_related_dicom_with_the_files_as_stored_and_bearer_auth(peer):
    peer.answers.append((200, _response(stored=UIDS)))
    with make_client(tls=None, auth=auth_for("bearer", "", "tok-123"), timeout=5) as client:
        outcomes = stow_files(FILES, peer.url, client)
    assert [o.ok for o in outcomes] == [True, True] and [o.status for o in outcomes] == [200, 200]
    path, headers, body = peer.requests[0]
    assert path == "/dicomweb/studies" and headers["Authorization"] == "Bearer tok-123"
    assert headers["Accept"] == "application/dicom+json"
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 2
    assert [p.get_payload(decode=True) for p in parts] == [f.read_bytes() for f in FILES]


def test_partial_answer_202_failed_sop_with_its_reason_and_whether_retrying_helps(peer):
    peer.answers.append((202, _response(stored=[UIDS[0]], failed=[(UIDS[1], 0xC122)])))
    peer.answers.append((409, _response(failed=[(UIDS[0], 0xA700), (UIDS[1], 0x0110)])))
    with make_client(tls=None, auth=auth_for("basic", "u", "p"), timeout=5) as client:
        first = stow_files(FILES, peer.url, client)
        second = stow_files(FILES, peer.url, client)
    assert first[0].ok and not first[1].ok
    assert first[1].failure_reason == 0xC122 and first[1].status == 0xC122 and not first[1].retry
    assert "Failed SOP Sequence (Failure Reason 0xC122)" in first[1].error
    assert not second[0].ok and second[0].retry  # 0xA700 out of resources: try again later
    assert not second[1].ok and not second[1].retry and second[1].http_status == 409
    assert peer.requests[0][1]["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("code,retry", [(503, True), (429, True), (400, False), (401, False), (415, False)])
def test_error_statuses_without_a_body_fail_every_file(peer, code, retry):
    peer.answers.append((code, None))
    with make_client(tls=None, auth=None, timeout=5) as client:
        outcomes = stow_files(FILES, peer.url, client)
    assert [(o.ok, o.http_status, o.retry) for o in outcomes] == [(False, code, retry)] * 2
    assert f"HTTP {code}" in outcomes[0].error


def test_no_server_is_a_retryable_failure_never_an_exception(tmp_path):
    missing = tmp_path / "gone.dcm"
    with make_client(tls=None, auth=None, timeout=2) as client:
        outcomes = stow_files([FILES[0], missing], "http://127.0.0.1:9", client)
    assert not outcomes[0].ok and outcomes[0].retry and "ConnectError" in outcomes[0].error
    assert not outcomes[1].ok and "cannot read the SR file" in outcomes[1].error
