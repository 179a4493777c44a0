"""STOW-RS (PS3.18 10.5): SR files to a DICOMweb destination over HTTP(S), through httpx.

One POST ``{url}/studies`` per batch, ``multipart/related; type="application/dicom"``, each part a
file as stored. The response's Store Instances Response Module decides each file:

- in the Referenced SOP Sequence (0008,1199): stored (a Warning Reason does not change that);
- in the Failed SOP Sequence (0008,1198): not stored, its Failure Reason (0008,1197) recorded;
- not named in the body: the HTTP status decides (200 stored; 202, 409 and the rest not).

Whether trying again can help is part of each outcome (``retry``): network errors, 408, 429 and
5xx, and a Failure Reason 0xA7xx (out of resources) can; other 4xx (bad request, authentication,
forbidden, not found, unsupported media type) and other Failure Reasons cannot until someone changes
the destination or the configuration: the outbox then waits its longest backoff between tries
(docs/worker.md, "Destinations").

Like worker/net/scu.store_files, ``stow_files`` never raises for a file or peer problem.
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger("cxr_worker.dicomweb")

#: HTTP statuses after which the same request may succeed.
RETRYABLE_HTTP = frozenset({408, 425, 429})
#: What STOW-RS responses say with 200/202/409 (PS3.18 Table 10.5.3-1).
STORED, PARTIAL, CONFLICT = 200, 202, 409


@dataclass(frozen=True)
class StowOutcome:
    """What happened to one file: stored or not, the HTTP status, the Failure Reason, and whether
    trying again can help."""

    path: Path
    sop_instance_uid: str | None
    ok: bool
    http_status: int | None = None
    failure_reason: int | None = None
    error: str | None = None
    retry: bool = True

    @property
    def status(self) -> int | None:
        """The outbox's last_status: the Failure Reason when there is one, else the HTTP status."""
        return self.failure_reason if self.failure_reason is not None else self.http_status

    def __str__(self) -> str:
        return f"{self.path}: " + ("stored" if self.ok else self.error or "not stored")


def _retryable_http(code: int) -> bool:
    return code >= 500 or code in RETRYABLE_HTTP


def _retryable_reason(reason: int | None) -> bool:
    return reason is not None and (reason & 0xFF00) == 0xA700  # Refused: Out of Resources


def _sop_instance(path: Path) -> str | None:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.get("MediaStorageSOPInstanceUID") or "") or None
    except Exception:  # noqa: BLE001 - sent anyway; the peer says what it thinks of it
        return None


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _response_dataset(response: httpx.Response) -> Dataset | None:
    """The Store Instances Response Module, when the body holds one (DICOM JSON)."""
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        return None
    if isinstance(data, list):
        data = data[0] if data and isinstance(data[0], dict) else None
    if not isinstance(data, dict):
        return None
    try:
        return Dataset.from_json(data)
    except Exception:  # noqa: BLE001 - not a DICOM JSON object
        return None


def make_client(*, tls: ssl.SSLContext | None, auth: httpx.Auth | None, timeout: float) -> httpx.Client:
    """The HTTP client of one destination (kept: connections are reused between deliveries)."""
    return httpx.Client(verify=tls if tls is not None else True, auth=auth, timeout=timeout,
                        headers={"Accept": "application/dicom+json"})


def auth_for(kind: str, username: str, secret: str) -> httpx.Auth | None:
    """httpx authentication for settings.DestinationAuth ``kind`` ("none" | "bearer" | "basic")."""
    if kind == "basic":
        return httpx.BasicAuth(username, secret)
    if kind == "bearer":
        return _Bearer(secret)
    return None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = self._header
        yield request


def stow_files(paths: Sequence[Path], url: str, client: httpx.Client) -> list[StowOutcome]:
    """POST every file in one STOW-RS request to ``{url}/studies``; one outcome per path, in order."""
    paths = [Path(p) for p in paths]
    uids = [_sop_instance(p) for p in paths]
    parts, outcomes = [], {}
    for index, path in enumerate(paths):
        try:
            parts.append((index, path.read_bytes()))
        except OSError as exc:
            outcomes[index] = StowOutcome(path, uids[index], False, error=f"cannot read the SR file: {exc}")
    if parts:
        outcomes.update(_post(url, client, [(i, paths[i], uids[i], body) for i, body in parts]))
    result = [outcomes[i] for i in range(len(paths))]
    failed = sum(not o.ok for o in result)
    log.info("STOW-RS to %s: %d stored, %d failed", url, len(result) - failed, failed)
    return result


def _post(url: str, client: httpx.Client, parts: list[tuple[int, Path, str | None, bytes]]) -> dict[int, StowOutcome]:
    body, content_type = _multipart([p[3] for p in parts])
    target = f"{url}/studies"
    try:
        response = client.post(target, content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError as exc:
        why = f"STOW-RS to {target} failed: {type(exc).__name__}: {exc}"
        return {i: StowOutcome(path, uid, False, error=why) for i, path, uid, _ in parts}
    code = response.status_code
    answer = _response_dataset(response)
    stored: set[str] = set()
    failed: dict[str, int | None] = {}
    if answer is not None:
        for item in answer.get("ReferencedSOPSequence", None) or []:
            if item.get("ReferencedSOPInstanceUID"):
                stored.add(str(item.ReferencedSOPInstanceUID))
        for item in answer.get("FailedSOPSequence", None) or []:
            if item.get("ReferencedSOPInstanceUID"):
                reason = item.get("FailureReason")
                failed[str(item.ReferencedSOPInstanceUID)] = int(reason) if reason is not None else None
    outcomes = {}
    for i, path, uid, _ in parts:
        if uid in failed:
            reason = failed[uid]
            shown = f"0x{reason:04X}" if reason is not None else "none given"
            outcomes[i] = StowOutcome(path, uid, False, code, reason,
                                      f"STOW-RS: HTTP {code}, instance in the Failed SOP Sequence "
                                      f"(Failure Reason {shown})", retry=_retryable_reason(reason))
        elif uid in stored or (code == STORED and answer is None) or (code == STORED and not failed):
            outcomes[i] = StowOutcome(path, uid, True, code)
        else:
            detail = response.text.strip().replace("\n", " ")[:200] if answer is None else ""
            outcomes[i] = StowOutcome(path, uid, False, code, None,
                                      f"STOW-RS: HTTP {code} {response.reason_phrase}"
                                      + (f": {detail}" if detail else "")
                                      + ("" if answer is None else "; instance not in the response's Referenced SOP Sequence"),
                                      retry=_retryable_http(code))
    return outcomes
