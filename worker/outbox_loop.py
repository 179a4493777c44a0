"""The outbox sender: C-STORE each SR to its destination until accepted, surviving restarts.

Each outbox row is one SR file for one destination. The sender claims due rows (pending and
next_attempt <= now) with a lease, in one UPDATE ... RETURNING, sends all rows for one destination
over one association (worker/net/scu.store_files), commits each accepted SR as sent the moment its
C-STORE-RSP arrives, and puts the others back to pending with exponential backoff
(outbox.retry_base_seconds doubling up to outbox.retry_max_seconds).

The association stays open after a clean delivery and carries the next ones
(worker/net/associations.py) until it has been idle for outbox.idle_release_seconds or the
service stops. If the peer closed it meanwhile, the SR is sent again at once on a new association
(store_files), without counting a failed attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from .metrics import Metrics
from .net.associations import AssociationPool
from .net.tls import destination_context
from .settings import Settings
from .store.db import Database, OutboxItem
from .store.outbox import BATCH, Attempt, claim_due, mark_sent, settle

log = logging.getLogger("cxr_worker.outbox")

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
        self.pool = AssociationPool(settings.outbox.idle_release_seconds)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self.pool.release_idle()
                    if self.wake is not self.stop_event:
                        self.wake.clear()  # before the claim: an SR committed after it sets it again
                    items = claim_due(self.db, self.owner, self.settings.studies.lease_seconds)
                    if not items:
                        self.wake.wait(self._pause())
                        continue
                    groups: dict[tuple, list[OutboxItem]] = defaultdict(list)
                    for item in items:
                        groups[(item.host, item.port, item.ae_title, item.destination)].append(item)
                    for key, group in groups.items():
                        self.deliver(key, group)
                    if len(items) < BATCH and not self.wake.is_set():
                        self.wake.wait(self._pause())  # nothing new: no empty claim right after each SR
                except Exception:  # noqa: BLE001 - keep sending later
                    log.exception("outbox loop error; retrying in 1 s")
                    self.stop_event.wait(1.0)
        finally:
            self.pool.close()  # service stop: release the kept associations

    def _pause(self) -> float:
        """Sleep until the next poll, or until a kept association is due for release if sooner."""
        release_in = self.pool.next_release_in()
        poll = self.settings.outbox.poll_seconds
        return poll if release_in is None else min(poll, release_in)

    def deliver(self, key: tuple, group: list[OutboxItem]) -> None:
        """Send ``group`` (one destination) and record every outcome; each accepted SR is committed
        as sent the moment it is answered, so a crash re-sends at most one."""
        from .net.scu import store_files

        host, port, ae_title, name = key
        start = time.perf_counter()
        by_path, done = {Path(i.sr_path): i for i in group}, set()

        def accepted(outcome) -> None:
            item = by_path.get(Path(outcome.path))
            if not outcome.ok or item is None:
                return
            try:
                mark_sent(self.db, item.id, self.owner, outcome.status)  # before the next SR is sent
                done.add(item.id)
            except Exception:  # noqa: BLE001 - recorded with the others after the association
                log.exception("could not record delivery of SR %s", item.sr_sop_instance_uid)

        try:
            outcomes = store_files([Path(i.sr_path) for i in group], host, port, ae_title,
                                   calling_aet=self.settings.network.ae_title, tls=self.tls.get(name),
                                   timeout=self.settings.outbox.timeout, on_outcome=accepted, pool=self.pool)
        except Exception as exc:  # noqa: BLE001 - treat as a failed try for every item
            log.warning("delivery to %s failed: %s", name, exc)
            outcomes = [None] * len(group)
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = None
        elapsed = time.perf_counter() - start
        now = time.time()
        rest = [(item, outcome) for item, outcome in zip(group, outcomes) if item.id not in done]
        if rest:  # the accepted ones are committed already: no transaction at all in the usual case
            settle(self.db, self.owner, [self._after(item, outcome, error, now, name) for item, outcome in rest], now)
        for item, outcome in zip(group, outcomes):
            if outcome is None or not outcome.ok:
                self.metrics.delivery_failed(name)
            if outcome is not None and outcome.ok:
                self.sent += 1
                self.metrics.delivered(name)
                log.info("SR %s of study %s delivered to %s (%.3f s)", item.sr_sop_instance_uid,
                         item.study_uid, name, elapsed)

    def _after(self, item: OutboxItem, outcome, error: str | None, now: float, name: str) -> Attempt:
        """How a try not recorded as it was answered ended: sent, or due again after the backoff."""
        rsp_status = getattr(outcome, "status", None)
        if outcome is not None and outcome.ok:  # accepted, but its commit failed above
            return Attempt(item.id, rsp_status)
        attempts = item.attempts + 1
        delay = self.settings.outbox.backoff(attempts)
        why = (getattr(outcome, "error", None) or error or
               (f"status 0x{outcome.status:04X}" if outcome and outcome.status is not None else "failed"))
        log.warning("SR %s -> %s (%s@%s:%s) not delivered (try %d): %s; next try in %.1f s",
                    item.sr_sop_instance_uid, name, item.ae_title, item.host, item.port, attempts, why, delay)
        return Attempt(item.id, rsp_status, retry_at=now + delay, error=str(why))
