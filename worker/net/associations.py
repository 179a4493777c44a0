"""Requested associations: the peer, opening one, and keeping them open between deliveries.

One association per destination is kept (worker/net/scu.store_files(pool=...)).

The scorer wakes the outbox after every committed SR, so most deliveries carry one SR. Opening and
releasing an association for each cost more CPU than the C-STORE itself (two threads started and
stopped, A-ASSOCIATE and A-RELEASE round trips). The pool keeps the association after a clean
delivery and hands it out again while SRs keep coming:

- idle, its reactor is slowed down but not parked (worker/net/_pynetdicom/reactor.reactor_idle), so the peer's
  A-RELEASE-RQ is answered and an A-ABORT or a closed connection is noticed;
- it is reused only when still established, nothing arrived from the peer since (an idle peer
  sends nothing: anything readable is a release, an abort or a close), and it proposed every
  presentation context the next files need (else a new one is opened with the union);
- any failure on it (lost, timeout, refused status) drops it (store_files decides);
- it is released after ``idle_release_s`` without use (``release_idle``, called by the outbox
  loop) and on ``close()`` (service stop).

Not thread-safe: one sender thread (the outbox loop) uses a pool.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from ._pynetdicom.reactor import association_ending, reactor_awake, reactor_idle, reactor_parked

log = logging.getLogger("cxr_worker.associations")


DEFAULT_CALLING_AET = "CXR_WORKER"
#: A requestor may propose at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128

ContextPairs = list[tuple[str, tuple[str, ...]]]
"""Presentation contexts to propose, as (abstract syntax, transfer syntaxes) pairs."""


@dataclass(frozen=True)
class Peer:
    """Everything that defines an association we request (an AssociationPool key)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = DEFAULT_CALLING_AET
    tls: ssl.SSLContext | None = None
    timeout: float = 30
    max_pdu: int = 0


def _nodelay(event: evt.Event) -> None:
    """Send small PDUs (C-ECHO, the last P-DATA fragment) without Nagle's delay."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not fatal: only latency
        pass


def make_ae(calling_aet: str, timeout: float) -> AE:
    """An AE for requesting associations, every pynetdicom timeout set to ``timeout``."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _syntax_name(uid: str) -> str:
    return UID(uid).name or str(uid)


class NoContextAccepted(str):
    """The reason why no association: the peer answered A-ASSOCIATE-AC but accepted none of the
    proposed presentation contexts (pynetdicom then aborts the association itself). A ``str`` (the
    message for the whole batch) that also knows, per SOP class, what the peer said, so each file
    gets its own message (``for_file``), as DCMTK's storescu says "No presentation context"."""

    rejected: dict[str, tuple[list[str], str]]

    def __new__(cls, where: str, rejected: dict[str, tuple[list[str], str]]) -> "NoContextAccepted":
        classes = ", ".join(f"{_syntax_name(sop)} ({why})" for sop, (_, why) in rejected.items())
        self = super().__new__(cls, f"{where} accepted no presentation context: {classes}")
        self.where = where
        self.rejected = rejected
        return self

    def for_file(self, sop_class: str, transfer_syntax: str | None) -> str:
        syntaxes, why = self.rejected.get(sop_class, ([], "not proposed"))
        offered = ", ".join(_syntax_name(ts) for ts in syntaxes) or _syntax_name(transfer_syntax or "")
        return (f"{self.where} accepted no presentation context for {_syntax_name(sop_class)} "
                f"({sop_class}) with {offered}: {why}; the peer does not take this SOP class "
                f"or transfer syntax")


def open_association(ae: AE, peer: Peer, pairs: ContextPairs,
                     handlers: tuple = ()) -> tuple[Association | None, str | None]:
    """Request an association proposing ``pairs``; returns (assoc, None) or (None, reason).
    ``handlers``: pynetdicom event handlers bound to it (a Storage Commitment report on the same
    association: worker/net/commitment.report_handlers)."""
    contexts = []
    for abstract, syntaxes in pairs:
        context = PresentationContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list(syntaxes)
        contexts.append(context)
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        _nodelay(event)

    where = f"{peer.called_aet}@{peer.host}:{peer.port}"
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=contexts,
            ae_title=peer.called_aet,
            max_pdu=peer.max_pdu,
            tls_args=(peer.tls, peer.host) if peer.tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers],
        )
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"cannot open an association with {where}: {exc}"
    if assoc.is_established:
        return assoc, None
    if not connected:
        return None, f"cannot connect to {where}: connection refused, unreachable or timed out"
    if assoc.is_rejected:
        detail = ""
        primitive = getattr(assoc.acceptor, "primitive", None)
        if primitive is not None:
            detail = f": {primitive.result_str}, {primitive.source_str}, {primitive.reason_str}"
        return None, f"association rejected by {where}{detail}"
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        rejected: dict[str, tuple[list[str], str]] = {}
        for context in assoc.rejected_contexts:
            syntaxes, why = rejected.get(str(context.abstract_syntax), ([], ""))
            syntaxes += [str(ts) for ts in context.transfer_syntax if str(ts) not in syntaxes]
            status = context.status.lower()
            why = status if not why or status in why.split("; ") else f"{why}; {status}"
            rejected[str(context.abstract_syntax)] = (syntaxes, why)
        return None, NoContextAccepted(where, rejected)
    if assoc.is_aborted:
        return None, f"association aborted by {where} (or connection lost)"
    return None, f"no association with {where}: no answer to the association request"


def association_lost(assoc: Association) -> bool:
    """No longer usable: released, aborted, or the peer's abort/release/close not yet handled."""
    return not assoc.is_established or association_ending(assoc)


class OneShot:
    """A link like AssociationPool without keeping: store_files() without a pool: a new association per batch, released after it."""

    def __init__(self) -> None:
        self.ae: AE | None = None

    def checkout(self, peer: Peer, pairs: ContextPairs) -> tuple[Association | None, bool, str | None]:
        if self.ae is None:
            self.ae = make_ae(peer.calling_aet, peer.timeout)
        assoc, reason = open_association(self.ae, peer, pairs)
        return assoc, False, reason

    def checkin(self, assoc: Association, keep: bool) -> None:  # never kept
        if assoc.is_established:
            assoc.release()

    def close(self) -> None:
        if self.ae is not None:
            self.ae.shutdown()


@dataclass
class _Kept:
    assoc: Association
    pairs: set[tuple[str, tuple[str, ...]]]
    idle_since: float = field(default_factory=time.monotonic)


def _peer_spoke(assoc: Association) -> bool:
    """Anything to read on an idle association means the peer is releasing, aborting or gone."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable) or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)


def end_association(assoc: Association) -> None:
    """Release politely when it is still up; one the peer is already ending is left to its reactor."""
    reactor_awake(assoc)
    if assoc.is_established and not association_lost(assoc):
        with reactor_parked(assoc):  # the reactor must not take the A-RELEASE-RP (or an abort) from us
            assoc.release()


class AssociationPool:
    """At most one open association per Peer, reused until idle for ``idle_release_s`` (0: never kept)."""

    def __init__(self, idle_release_s: float, handlers: tuple = ()) -> None:
        self.idle_release_s = idle_release_s
        self.handlers = tuple(handlers)  # bound to every association it opens (open_association)
        self.opened = 0  # associations requested (established or not), for logs and tests
        self._aes: dict[Peer, AE] = {}
        self._kept: dict[Peer, _Kept] = {}
        self._out: dict[int, tuple[Peer, set]] = {}  # id(assoc) -> (peer, proposed pairs) while checked out

    def checkout(self, peer: Peer, pairs: ContextPairs) -> tuple[Association | None, bool, str | None]:
        """(association, reused, None), or (None, False, why not): the kept one if still good."""
        wanted = set(pairs)
        kept = self._kept.pop(peer, None)
        if kept is not None:
            good = not association_lost(kept.assoc) and not _peer_spoke(kept.assoc)
            if good and wanted <= kept.pairs:
                reactor_awake(kept.assoc)
                self._out[id(kept.assoc)] = (peer, kept.pairs)
                return kept.assoc, True, None
            log.debug("kept association with %s@%s:%s %s; opening a new one", peer.called_aet, peer.host,
                      peer.port, "lacks a presentation context" if good else "is being closed by the peer")
            if good:
                if len(kept.pairs | wanted) <= MAX_CONTEXTS:
                    pairs = list(dict.fromkeys([*pairs, *sorted(kept.pairs)]))  # keep what it could send too
                end_association(kept.assoc)
            else:  # its reactor, awake, answers the peer's release or handles the abort or close
                reactor_awake(kept.assoc)
        ae = self._aes.get(peer)
        if ae is None:
            ae = self._aes[peer] = make_ae(peer.calling_aet, peer.timeout)
        self.opened += 1
        assoc, reason = open_association(ae, peer, pairs, self.handlers)
        if assoc is None:
            return None, False, reason
        self._out[id(assoc)] = (peer, set(pairs))
        return assoc, False, None

    def checkin(self, assoc: Association, keep: bool) -> None:
        """Back from a delivery: kept for the next one when ``keep`` (the delivery was clean)."""
        peer, pairs = self._out.pop(id(assoc))
        if keep and self.idle_release_s > 0 and not association_lost(assoc):
            reactor_idle(assoc)
            self._kept[peer] = _Kept(assoc, pairs)
        else:
            end_association(assoc)

    def next_release_in(self) -> float | None:
        """Seconds until the next idle association is due for release (None: none kept)."""
        if not self._kept:
            return None
        first = min(k.idle_since for k in self._kept.values())
        return max(0.0, first + self.idle_release_s - time.monotonic())

    def release_idle(self) -> int:
        """Release the associations idle for ``idle_release_s`` or more; returns how many."""
        now = time.monotonic()
        due = [peer for peer, k in self._kept.items() if now - k.idle_since >= self.idle_release_s]
        for peer in due:
            kept = self._kept.pop(peer)
            log.debug("releasing association with %s@%s:%s after %.1f s idle", peer.called_aet, peer.host,
                      peer.port, now - kept.idle_since)
            end_association(kept.assoc)
        return len(due)

    def close(self) -> None:
        """Release every kept association (service stop)."""
        for peer in list(self._kept):
            end_association(self._kept.pop(peer).assoc)
        for ae in self._aes.values():
            ae.shutdown()
        self._aes.clear()
