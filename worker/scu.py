"""DICOM client side: C-STORE (outbox sender, `cxr-worker send`) and C-ECHO.

store_files() never raises for per-file or per-peer problems: every file gets a StoreOutcome that
says what happened, so the caller can retry exactly the ones that failed.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification


from .reactor import reactor_parked

LOG = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "CXR_WORKER"
#: C-STORE statuses that mean the peer kept the instance (Success, and the three storage warnings:
#: coercion of data elements, elements discarded, data set does not match SOP class).
SUCCESS = 0x0000
ACCEPTED_STATUSES = frozenset({SUCCESS, 0xB000, 0xB006, 0xB007})
#: A requestor may propose at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)



@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one file: the peer's status, or None and an error when none came back."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ACCEPTED_STATUSES

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: stored (0x{self.status:04X})"
        if self.status is not None:
            return f"{self.path}: refused with status 0x{self.status:04X}" + (f" ({self.error})" if self.error else "")
        return f"{self.path}: {self.error}"


@dataclass
class _Item:
    path: Path
    sop_class: str | None = None
    sop_instance: str | None = None
    transfer_syntax: str | None = None
    error: str | None = None


def _nodelay(event: evt.Event) -> None:
    """Send small PDUs (C-ECHO, the last P-DATA fragment) without Nagle's delay."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not fatal: only latency
        pass


def _make_ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(
    ae: AE,
    host: str,
    port: int,
    called_aet: str,
    contexts: list[PresentationContext],
    tls: ssl.SSLContext | None,
    max_pdu: int,
):
    """Open an association; returns (assoc, None) or (None, reason)."""
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _nodelay(event)

    try:
        assoc = ae.associate(
            host,
            port,
            contexts=contexts,
            ae_title=called_aet,
            max_pdu=max_pdu,
            tls_args=(tls, host) if tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        )
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"cannot open an association with {called_aet}@{host}:{port}: {exc}"
    if assoc.is_established:
        return assoc, None
    where = f"{called_aet}@{host}:{port}"
    if not connected:
        return None, f"cannot connect to {where}: connection refused, unreachable or timed out"
    if assoc.is_rejected:
        detail = ""
        primitive = getattr(assoc.acceptor, "primitive", None)
        if primitive is not None:
            detail = f": {primitive.result_str}, {primitive.source_str}, {primitive.reason_str}"
        return None, f"association rejected by {where}{detail}"
    if assoc.is_aborted:
        return None, f"association aborted by {where} (or connection lost)"
    return None, f"no association with {where}: no answer to the association request"


def _read_header(path: Path) -> _Item:
    item = _Item(path=Path(path))
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad files
        item.error = f"not a readable DICOM file: {exc}"
        return item
    meta = getattr(ds, "file_meta", None) or Dataset()
    item.sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "") or None
    item.sop_instance = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "") or None
    item.transfer_syntax = str(meta.get("TransferSyntaxUID") or "") or None
    if item.transfer_syntax is None:
        item.transfer_syntax = ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian
    if not item.sop_class or not item.sop_instance:
        item.error = "not a storable DICOM instance (no SOP Class/Instance UID)"
    return item


def _contexts_for(items: Iterable[_Item]) -> list[tuple[str, tuple[str, ...]]]:
    """(abstract syntax, transfer syntaxes) pairs: each file's own syntax first, then uncompressed."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for item in items:
        ts = item.transfer_syntax
        if ts not in UNCOMPRESSED:
            wanted[(item.sop_class, (ts,))] = None
        wanted[(item.sop_class, UNCOMPRESSED)] = None
    return list(wanted)


def _batches(items: list[_Item]) -> list[list[_Item]]:
    """Split by SOP class so that no association needs more than MAX_CONTEXTS contexts."""
    by_class: dict[str, list[_Item]] = {}
    for item in items:
        by_class.setdefault(item.sop_class, []).append(item)
    batches: list[list[_Item]] = [[]]
    for group in by_class.values():
        if batches[-1] and len(_contexts_for(batches[-1] + group)) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(group)
    return [b for b in batches if b]


def _accepted_syntaxes(assoc, sop_class: str) -> set[str]:
    return {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}


def _send_one(assoc, item: _Item) -> StoreOutcome:
    accepted = _accepted_syntaxes(assoc, item.sop_class)
    if not accepted:
        name = UID(item.sop_class).name
        return StoreOutcome(item.path, item.sop_instance, None, f"the peer accepted no presentation context for {name}")
    try:
        ds = pydicom.dcmread(item.path)
    except Exception as exc:  # noqa: BLE001
        return StoreOutcome(item.path, item.sop_instance, None, f"not a readable DICOM file: {exc}")
    try:
        if item.transfer_syntax not in accepted and UID(item.transfer_syntax).is_compressed:
            # The peer refused the stored (compressed) syntax but takes uncompressed data: decode,
            # keeping the SOP Instance UID (same instance, different encoding).
            ds.decompress(generate_instance_uid=False)
        rsp = assoc.send_c_store(ds)
    except Exception as exc:  # noqa: BLE001 - report, never escape for one file
        return StoreOutcome(item.path, item.sop_instance, None, f"cannot send: {exc}")
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        return StoreOutcome(item.path, item.sop_instance, None, "no C-STORE response (timeout or association aborted)")
    error = None if int(status) in ACCEPTED_STATUSES else str(rsp.get("ErrorComment", "") or "") or None
    return StoreOutcome(item.path, item.sop_instance, int(status), error)


def store_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 30,
    max_pdu: int = 0,
    progress: bool = False,
    on_outcome: Callable[[StoreOutcome], None] | None = None,
) -> list[StoreOutcome]:
    """C-STORE every file over one association (more only past 128 presentation contexts).

    Files are sent in their stored transfer syntax (a compressed one falls back to uncompressed
    only when the peer refuses it). Returns one outcome per path, in order.
    """
    items = [_read_header(Path(p)) for p in paths]
    outcomes: dict[int, StoreOutcome] = {}
    for index, item in enumerate(items):
        if item.error:
            outcomes[index] = StoreOutcome(item.path, item.sop_instance, None, item.error)
    pending = [(i, it) for i, it in enumerate(items) if i not in outcomes]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="file", desc=f"C-STORE {called_aet}")
        bar.update(len(outcomes))

    def record(index: int, outcome: StoreOutcome) -> None:
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
        if bar is not None:
            bar.update(1)

    index_of = {id(it): i for i, it in pending}
    ae = _make_ae(calling_aet, timeout)
    try:
        for batch in _batches([it for _, it in pending]):
            contexts = []
            for abstract, syntaxes in _contexts_for(batch):
                context = PresentationContext()
                context.abstract_syntax = abstract
                context.transfer_syntax = list(syntaxes)
                contexts.append(context)
            assoc, reason = _associate(ae, host, port, called_aet, contexts, tls, max_pdu)
            if assoc is None:
                for it in batch:
                    record(index_of[id(it)], StoreOutcome(it.path, it.sop_instance, None, reason))
                continue
            try:
                with reactor_parked(assoc):
                    for it in batch:
                        if not assoc.is_established:
                            record(index_of[id(it)], StoreOutcome(it.path, it.sop_instance, None,
                                                                  "association lost before sending"))
                            continue
                        record(index_of[id(it)], _send_one(assoc, it))
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        ae.shutdown()
        if bar is not None:
            bar.close()
    result = [outcomes[i] for i in range(len(items))]
    failed = sum(not o.ok for o in result)
    LOG.info("C-STORE to %s@%s:%s: %d sent, %d failed", called_aet, host, port, len(result) - failed, failed)
    return result


def echo_detail(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> tuple[int | None, str | None]:
    """C-ECHO; (status, None) when the peer answered, else (None, why not)."""
    ae = _make_ae(calling_aet, timeout)
    context = PresentationContext()
    context.abstract_syntax = Verification
    context.transfer_syntax = list(UNCOMPRESSED)
    try:
        assoc, reason = _associate(ae, host, port, called_aet, [context], tls, 0)
        if assoc is None:
            return None, reason
        try:
            rsp = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            return None, f"no C-ECHO response from {called_aet}@{host}:{port}"
        return int(status), None
    finally:
        ae.shutdown()


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> int | None:
    """C-ECHO; returns the peer's status (0 is success) or None when no association/response."""
    status, reason = echo_detail(host, port, called_aet, calling_aet, tls=tls, timeout=timeout)
    if reason:
        LOG.debug("C-ECHO: %s", reason)
    return status
