"""DICOM client side: C-STORE (outbox sender, `cxr-worker send`) and C-ECHO.

store_files() never raises for per-file or per-peer problems: every file gets a StoreOutcome that
says what happened, so the caller can retry exactly the ones that failed.

A file goes out as stored: its path is given to pynetdicom, which (with worker.net.install()) sends
the encoded data set from the file, never decoded or re-encoded. Only a file the peer cannot take
in its own transfer syntax (or one without complete file meta) is read with pydicom, decompressed
when the peer refused its compressed syntax, and re-encoded by pynetdicom for an accepted one.
"""

from __future__ import annotations

import logging
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
from pynetdicom.sop_class import Verification

from ._pynetdicom.reactor import reactor_parked
from .status import ACCEPTED
from .associations import (
    DEFAULT_CALLING_AET,
    MAX_CONTEXTS,
    AssociationPool,
    ContextPairs,
    NoContextAccepted,
    OneShot,
    Peer,
    association_lost,
    make_ae,
    open_association,
)

LOG = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_META_KEYS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")

@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one file: the peer's status, or None and an error when none came back."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ACCEPTED

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
    meta: bool = False  # all three from the file meta: pynetdicom can send the file as stored


def _read_header(path: Path) -> _Item:
    """SOP class, instance and transfer syntax: from the file meta alone when it has all three (a
    small read; our SRs always do), else from the data set's header."""
    item = _Item(path=Path(path))
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part 10 file: the full read below says why
        meta = Dataset()
    values = [str(meta.get(key) or "") for key in _META_KEYS]
    if all(values):
        item.sop_class, item.sop_instance, item.transfer_syntax = values
        item.meta = True
        return item
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


def _contexts_for(items: Iterable[_Item]) -> ContextPairs:
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
    if not accepted:  # the peer took other SOP classes of this batch, not this one
        name = UID(item.sop_class).name or item.sop_class
        return StoreOutcome(item.path, item.sop_instance, None,
                            f"the peer accepted no presentation context for {name} ({item.sop_class}) "
                            f"with {UID(item.transfer_syntax).name or item.transfer_syntax} or an uncompressed "
                            f"syntax; the peer does not take this SOP class or transfer syntax")
    dataset: Path | Dataset = item.path  # the file as stored (module docstring)
    if not (item.meta and item.transfer_syntax in accepted):
        try:
            dataset = pydicom.dcmread(item.path)
        except Exception as exc:  # noqa: BLE001
            return StoreOutcome(item.path, item.sop_instance, None, f"not a readable DICOM file: {exc}")
    try:
        if item.transfer_syntax not in accepted and UID(item.transfer_syntax).is_compressed:
            # The peer refused the stored (compressed) syntax but takes uncompressed data: decode,
            # keeping the SOP Instance UID (same instance, different encoding).
            dataset.decompress(generate_instance_uid=False)
        rsp = assoc.send_c_store(dataset)
    except Exception as exc:  # noqa: BLE001 - report, never escape for one file
        return StoreOutcome(item.path, item.sop_instance, None, f"cannot send: {exc}")
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        return StoreOutcome(item.path, item.sop_instance, None, "no C-STORE response (timeout or association aborted)")
    error = None if int(status) in ACCEPTED else str(rsp.get("ErrorComment", "") or "") or None
    return StoreOutcome(item.path, item.sop_instance, int(status), error)


def _send_batch(link: OneShot | AssociationPool, peer: Peer, batch: list[_Item],
                record: Callable[[_Item, StoreOutcome], None], also: ContextPairs = ()) -> None:
    """Send one batch over one association from ``link``; a kept association that the peer had
    just closed costs no file: its first file is sent again at once over a fresh association."""
    assoc, reused, reason = link.checkout(peer, _contexts_for(batch) + list(also))
    if assoc is None:
        for it in batch:
            why = reason.for_file(it.sop_class, it.transfer_syntax) if isinstance(reason, NoContextAccepted) else reason
            record(it, StoreOutcome(it.path, it.sop_instance, None, why))
        return
    healthy, rest = True, list(batch)
    try:
        with reactor_parked(assoc):
            while rest:
                it = rest[0]
                if association_lost(assoc):
                    outcome = StoreOutcome(it.path, it.sop_instance, None, "association lost before sending")
                else:
                    outcome = _send_one(assoc, it)
                lost = association_lost(assoc)
                if reused and it is batch[0] and outcome.status is None and lost:
                    break  # the kept association was gone before our first C-STORE: not this file's failure
                record(it, outcome)
                rest.pop(0)
                healthy = healthy and not lost and (outcome.status is None or outcome.ok)
    finally:
        link.checkin(assoc, keep=healthy and not rest and not association_lost(assoc))
    if rest:
        LOG.info("kept association with %s@%s:%s was closed by the peer; sending again on a new one",
                 peer.called_aet, peer.host, peer.port)
        _send_batch(link, peer, rest, record, also)  # the pool has none kept now: fresh, so no third try


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
    pool: AssociationPool | None = None,
    also_propose: ContextPairs = (),
) -> list[StoreOutcome]:
    """C-STORE every file over one association (more only past 128 presentation contexts).

    Files are sent in their stored transfer syntax (a compressed one falls back to uncompressed
    only when the peer refuses it). Returns one outcome per path, in order. With ``pool``
    (worker/net/associations.py) the association is taken from it and left open for the next
    call, so a stream of single files pays association setup and release once. ``also_propose``:
    presentation contexts proposed besides the files' (Storage Commitment, which the outbox then
    requests over the same association).
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

    index_of = {id(it): i for i, it in pending}

    def record(item: _Item, outcome: StoreOutcome) -> None:
        outcomes[index_of[id(item)]] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
        if bar is not None:
            bar.update(1)

    peer = Peer(host, port, called_aet, calling_aet, tls, timeout, max_pdu)
    link = pool if pool is not None else OneShot()
    try:
        for batch in _batches([it for _, it in pending]):
            _send_batch(link, peer, batch, record, also_propose)
    finally:
        if pool is None:
            link.close()
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
    ae = make_ae(calling_aet, timeout)
    try:
        assoc, reason = open_association(ae, Peer(host, port, called_aet, calling_aet, tls, timeout),
                                         [(Verification, UNCOMPRESSED)])
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
