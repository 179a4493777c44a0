"""The outbox sender: C-STORE each SR (and, before it, the heatmap objects it references) to its
destination until accepted, surviving restarts.

Each outbox row is one SR file for one destination. The sender claims due rows (pending and
next_attempt <= now) with a lease, in one UPDATE ... RETURNING, sends all rows for one destination
over one association (worker/net/scu.store_files), commits each accepted SR as sent the moment its
C-STORE-RSP arrives, and puts the others back to pending with exponential backoff
(outbox.retry_base_seconds doubling up to outbox.retry_max_seconds). The heatmap objects an SR
references are recorded as sent together, in one transaction once the association has carried the
group (each commit is an fsync, and the receiver's commits wait their turn behind it: two more per
positive study slowed ingest); a crash before it sends that group's objects again, the same
instances (same UIDs, same bytes), and their SR still only after them.

The association stays open after a clean delivery and carries the next ones
(worker/net/associations.py) until it has been idle for outbox.idle_release_seconds or the
service stops. If the peer closed it meanwhile, the SR is sent again at once on a new association
(store_files), without counting a failed attempt.

A ``kind = "dicomweb"`` destination gets the same rows, leases and backoff, its SRs sent with
STOW-RS (worker/net/dicomweb.py) over a kept HTTP client; a failure that retrying cannot mend (a 4xx,
a Failure Reason other than out-of-resources) waits outbox.retry_max_seconds between tries.

A destination with ``storage_commitment = true``: after delivery its rows are requested for
Storage Commitment (worker/net/commitment.py, the N-ACTION over the same kept association), one
request per destination and batch; the report arrives at the listener (store/outbox.record_commitment);
a request without a report within the destination's commitment_timeout is repeated after backoff
(store/outbox.expire_commitments).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from pydicom.uid import generate_uid

from .metrics import Metrics
from .net.associations import AssociationPool, Peer
from .net.tls import destination_context
from .settings import Destination, Settings
from .store.db import Database, OutboxItem
from .store.outbox import (BATCH, Attempt, CommitmentReport, Recorded, begin_commitment, claim_commitments,
                           claim_due, expire_commitments, mark_sent, not_requested, record_commitment, settle)

log = logging.getLogger("cxr_worker.outbox")

def _what(item: OutboxItem) -> str:
    """How a row's file is named in the log: "SR", or its heatmap object kind."""
    return f"heatmap {item.kind}" if item.kind else "SR"


class OutboxLoop(threading.Thread):
    """Sends due SRs. ``wake`` is set by the scorer when an SR is committed, so a new SR leaves at
    once; ``outbox.poll_seconds`` only paces retries (backoff) and rows of other workers."""

    def __init__(self, settings: Settings, db: Database, owner: str, stop: threading.Event,
                 wake: threading.Event | None = None, metrics: Metrics | None = None) -> None:
        super().__init__(name="outbox", daemon=True)
        self.metrics = metrics if metrics is not None else Metrics()
        self.settings, self.db, self.owner, self.stop_event = settings, db, owner, stop
        self.wake = wake if wake is not None else stop
        self.sent = 0
        # TLS destinations: contexts built (files loaded) at start-up; a bad file is a SettingsError.
        self.tls = {d.name: destination_context(d, settings.tls.minimum_version) for d in settings.destinations}
        self.destinations = {d.name: d for d in settings.destinations}
        self.commitment = any(d.storage_commitment for d in settings.destinations)
        handlers = ()
        if self.commitment:  # a report on the association that carried the request is taken there
            from .net.commitment import report_handlers

            handlers = report_handlers(self._record_report)
        self.pool = AssociationPool(settings.outbox.idle_release_seconds, handlers)
        # dicomweb destinations: their secrets read now (a missing variable is a SettingsError at start-up)
        self.secrets = {d.name: d.secret(os.environ) for d in settings.destinations if d.is_dicomweb}
        self.http: dict[str, object] = {}  # destination name -> httpx.Client, opened on first use
        self.commitment_requests = 0  # N-ACTIONs answered Success

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self.pool.release_idle()
                    if self.wake is not self.stop_event:
                        self.wake.clear()  # before the claim: an SR committed after it sets it again
                    items = claim_due(self.db, self.owner, self.settings.studies.lease_seconds)
                    groups: dict[tuple, list[OutboxItem]] = defaultdict(list)
                    for item in items:
                        groups[(item.host, item.port, item.ae_title, item.destination, item.url)].append(item)
                    for key, group in groups.items():
                        self.deliver(key, group)
                    requests: list[OutboxItem] = []
                    if self.commitment:  # after the deliveries: the SRs just delivered are asked about at once
                        late = expire_commitments(self.db, time.time(), self.settings.outbox.backoff)
                        if late:
                            log.warning("%d storage commitment request(s) got no report in time; requesting "
                                        "again after the backoff", late)
                        requests = claim_commitments(self.db, self.owner, self.settings.studies.lease_seconds)
                    if not items and not requests:
                        self.wake.wait(self._pause())
                        continue
                    asks: dict[tuple, list[OutboxItem]] = defaultdict(list)
                    for item in requests:
                        asks[(item.host, item.port, item.ae_title, item.destination)].append(item)
                    for key, group in asks.items():
                        self.request_commitment(key, group)
                    if len(items) < BATCH and len(requests) < BATCH and not self.wake.is_set():
                        self.wake.wait(self._pause())  # nothing new: no empty claim right after each SR
                except Exception:  # noqa: BLE001 - keep sending later
                    log.exception("outbox loop error; retrying in 1 s")
                    self.stop_event.wait(1.0)
        finally:
            self.pool.close()  # service stop: release the kept associations
            for client in self.http.values():
                client.close()

    def _pause(self) -> float:
        """Sleep until the next poll, or until a kept association is due for release if sooner."""
        release_in = self.pool.next_release_in()
        poll = self.settings.outbox.poll_seconds
        return poll if release_in is None else min(poll, release_in)

    def _record_report(self, report: CommitmentReport) -> Recorded:
        """A Storage Commitment report that came on one of our associations (its reactor thread)."""
        recorded = record_commitment(self.db, report)
        if recorded.resend and self.wake is not self.stop_event:
            self.wake.set()  # the SRs it lists as failed go again at once
        return recorded

    def _destination(self, name: str) -> Destination | None:
        return self.destinations.get(name)

    def _client(self, name: str):
        """The kept httpx client of dicomweb destination ``name`` (its TLS context and auth)."""
        from .net.dicomweb import auth_for, make_client

        client = self.http.get(name)
        if client is None:
            d = self._destination(name)
            auth = auth_for(d.auth, d.username, self.secrets.get(name, "")) if d is not None else None
            client = self.http[name] = make_client(tls=self.tls.get(name), auth=auth,
                                                   timeout=self.settings.outbox.timeout)
        return client

    def deliver(self, key: tuple, group: list[OutboxItem]) -> None:
        """Send ``group`` (one destination) and record every outcome; each accepted SR is committed
        as sent the moment it is answered, so a crash re-sends at most one."""
        from .net.commitment import CONTEXT as COMMITMENT_CONTEXT
        from .net.scu import store_files

        host, port, ae_title, name = key[:4]
        url = group[0].url  # a dicomweb destination's rows (the group key has it too)
        start = time.perf_counter()
        by_path, done = {Path(i.sr_path): i for i in group}, set()
        objects = False  # a heatmap object was accepted: its SR may be due once the group is recorded

        def accepted(outcome) -> None:
            nonlocal objects
            item = by_path.get(Path(outcome.path))
            if not outcome.ok or item is None:
                return
            if item.evidence_for:  # an SR's object: recorded with the group (settle below, module docstring)
                objects = True
                return
            try:
                mark_sent(self.db, item.id, self.owner, outcome.status)  # before the next SR is sent
                done.add(item.id)
            except Exception:  # noqa: BLE001 - recorded with the others after the association
                log.exception("could not record delivery of %s %s", item.kind or "SR", item.sr_sop_instance_uid)

        try:
            if url:
                from .net.dicomweb import stow_files

                outcomes = stow_files([Path(i.sr_path) for i in group], url, self._client(name))
                for outcome in outcomes:
                    accepted(outcome)
            else:
                d = self._destination(name)
                outcomes = store_files([Path(i.sr_path) for i in group], host, port, ae_title,
                                       calling_aet=self.settings.network.ae_title, tls=self.tls.get(name),
                                       timeout=self.settings.outbox.timeout, on_outcome=accepted, pool=self.pool,
                                       also_propose=[COMMITMENT_CONTEXT] if d is not None and d.storage_commitment
                                       else [])
        except Exception as exc:  # noqa: BLE001 - treat as a failed try for every item
            log.warning("delivery to %s failed: %s", name, exc)
            outcomes = [None] * len(group)
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = None
        elapsed = time.perf_counter() - start
        now = time.time()
        rest = [(item, outcome) for item, outcome in zip(group, outcomes) if item.id not in done]
        if rest:  # accepted SRs are committed already: no transaction at all for a group of SRs alone
            settle(self.db, self.owner, [self._after(item, outcome, error, now, name) for item, outcome in rest], now)
        if objects and self.wake is not self.stop_event:
            self.wake.set()  # the SRs that waited for these objects may be due now: claim them at once
        for item, outcome in zip(group, outcomes):
            if outcome is None or not outcome.ok:
                self.metrics.delivery_failed(name)
            if outcome is not None and outcome.ok:
                self.sent += 1
                self.metrics.delivered(name)
                log.info("%s %s of study %s delivered to %s (%.3f s)", _what(item), item.sr_sop_instance_uid,
                         item.study_uid, name, elapsed)

    def _after(self, item: OutboxItem, outcome, error: str | None, now: float, name: str) -> Attempt:
        """How a try not recorded as it was answered ended: sent, or due again after the backoff."""
        rsp_status = getattr(outcome, "status", None)
        if outcome is not None and outcome.ok:  # accepted: a heatmap object, or an SR whose commit failed above
            return Attempt(item.id, rsp_status)
        attempts = item.attempts + 1
        delay = self.settings.outbox.backoff(attempts)
        if not getattr(outcome, "retry", True):  # STOW-RS: retrying the same request cannot help
            delay = self.settings.outbox.retry_max_seconds
        why = (getattr(outcome, "error", None) or error or
               (f"status 0x{outcome.status:04X}" if outcome and outcome.status is not None else "failed"))
        where = item.url or f"{item.ae_title}@{item.host}:{item.port}"
        log.warning("%s %s -> %s (%s) not delivered (try %d): %s; next try in %.1f s",
                    _what(item), item.sr_sop_instance_uid, name, where, attempts, why, delay)
        return Attempt(item.id, rsp_status, retry_at=now + delay, error=str(why))

    def request_commitment(self, key: tuple, group: list[OutboxItem]) -> None:
        """One Storage Commitment request for ``group`` (one destination, delivered SRs): its
        Transaction UID recorded, then the N-ACTION; a failed request is repeated after backoff."""
        from .net.commitment import request_commitment, sop_class_of

        host, port, ae_title, name = key
        d = self._destination(name)
        timeout = d.commitment_timeout if d is not None else Destination.commitment_timeout
        references, missing = [], []
        for item in group:
            sop_class = sop_class_of(Path(item.sr_path))
            (references if sop_class else missing).append((item, sop_class))
        now = time.time()
        for item, _ in missing:  # the SR file is gone: nothing to ask about; say so and retry later
            not_requested(self.db, self.owner, [item.id], now + self.settings.outbox.retry_max_seconds,
                          f"cannot read the SR file {item.sr_path} for the storage commitment request")
        if not references:
            return
        ids = [item.id for item, _ in references]
        transaction_uid = generate_uid()
        begin_commitment(self.db, self.owner, ids, transaction_uid, timeout)
        peer = Peer(host, port, ae_title, self.settings.network.ae_title, self.tls.get(name),
                    self.settings.outbox.timeout)
        error = request_commitment(peer, transaction_uid,
                                   [(c, item.sr_sop_instance_uid) for item, c in references], pool=self.pool)
        if error is None:
            self.commitment_requests += 1
            log.info("storage commitment of %d SR(s) requested from %s (transaction %s)", len(ids), name,
                     transaction_uid)
            return
        attempts = max(item.attempts for item, _ in references) + 1
        delay = self.settings.outbox.backoff(attempts)
        log.warning("storage commitment request to %s (%s@%s:%s) failed: %s; next try in %.1f s", name, ae_title,
                    host, port, error, delay)
        not_requested(self.db, self.owner, ids, time.time() + delay, error)
