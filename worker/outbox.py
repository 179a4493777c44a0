"""The outbox sender: C-STORE each SR to its destination until accepted, surviving restarts.

Each outbox row is one SR file for one destination. The sender claims due rows (pending and
next_attempt <= now) with a lease, sends all rows for one destination over one association
(worker/scu.store_files), then marks each sent, or pending again with exponential backoff
(outbox.retry_base_seconds doubling up to outbox.retry_max_seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select, update

from . import db as dbm
from .db import Database, OutboxItem
from .settings import Settings
from .tls import destination_context

log = logging.getLogger("cxr_worker.outbox")

BATCH = 32


def claim_due(db: Database, owner: str, lease_seconds: float, limit: int = BATCH) -> list[OutboxItem]:
    now = time.time()
    taken: list[OutboxItem] = []
    with db.session() as s, s.begin():
        query = (select(OutboxItem.id).where(OutboxItem.status == dbm.OUTBOX_PENDING, OutboxItem.next_attempt <= now)
                 .order_by(OutboxItem.next_attempt, OutboxItem.id).limit(limit))
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        for oid in s.scalars(query).all():
            if s.execute(update(OutboxItem).where(OutboxItem.id == oid, OutboxItem.status == dbm.OUTBOX_PENDING)
                         .values(status=dbm.OUTBOX_SENDING, lease_owner=owner,
                                 lease_expires=now + lease_seconds)).rowcount:
                taken.append(s.get(OutboxItem, oid))
    return taken


class OutboxLoop(threading.Thread):
    """Sends due SRs. ``wake`` is set by the scorer when an SR is committed, so a new SR leaves at
    once; ``outbox.poll_seconds`` only paces retries (backoff) and rows of other workers."""

    def __init__(self, settings: Settings, db: Database, owner: str, stop: threading.Event,
                 wake: threading.Event | None = None) -> None:
        super().__init__(name="outbox", daemon=True)
        self.settings, self.db, self.owner, self.stop_event = settings, db, owner, stop
        self.wake = wake if wake is not None else stop
        self.sent = 0
        # TLS destinations: contexts built (files loaded) at start-up; a bad file is a SettingsError.
        self.tls = {d.name: destination_context(d, settings.tls.minimum_version) for d in settings.destinations}

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self.wake is not self.stop_event:
                    self.wake.clear()  # before the claim: an SR committed after it sets it again
                items = claim_due(self.db, self.owner, self.settings.studies.lease_seconds)
                if not items:
                    self.wake.wait(self.settings.outbox.poll_seconds)
                    continue
                groups: dict[tuple, list[OutboxItem]] = defaultdict(list)
                for item in items:
                    groups[(item.host, item.port, item.ae_title, item.destination)].append(item)
                for key, group in groups.items():
                    self.deliver(key, group)
            except Exception:  # noqa: BLE001 - keep sending later
                log.exception("outbox loop error; retrying in 1 s")
                self.stop_event.wait(1.0)

    def deliver(self, key: tuple, group: list[OutboxItem]) -> None:
        from .scu import store_files

        host, port, ae_title, name = key
        start = time.perf_counter()
        by_path, done = {Path(i.sr_path): i for i in group}, set()

        def accepted(outcome) -> None:  # commit each accepted SR at once: a crash re-sends at most one
            item = by_path.get(Path(outcome.path))
            if not outcome.ok or item is None:
                return
            try:
                with self.db.session() as s, s.begin():
                    s.execute(update(OutboxItem).where(OutboxItem.id == item.id, OutboxItem.lease_owner == self.owner)
                              .values(status=dbm.OUTBOX_SENT, sent=time.time(), last_error=None, lease_owner=None,
                                      lease_expires=None, attempts=OutboxItem.attempts + 1, last_status=outcome.status))
                done.add(item.id)
            except Exception:  # noqa: BLE001 - recorded with the others after the association
                log.exception("could not record delivery of SR %s", item.sr_sop_instance_uid)

        try:
            outcomes = store_files([Path(i.sr_path) for i in group], host, port, ae_title,
                                   calling_aet=self.settings.network.ae_title, tls=self.tls.get(name),
                                   timeout=self.settings.outbox.timeout, on_outcome=accepted)
        except Exception as exc:  # noqa: BLE001 - treat as a failed try for every item
            log.warning("delivery to %s failed: %s", name, exc)
            outcomes = [None] * len(group)
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = None
        elapsed = time.perf_counter() - start
        now = time.time()
        with self.db.session() as s, s.begin():
            for item, outcome in zip(group, outcomes):
                ok = outcome is not None and outcome.ok
                values: dict = dict(lease_owner=None, lease_expires=None, attempts=OutboxItem.attempts + 1,
                                    last_status=getattr(outcome, "status", None))
                if ok:
                    values.update(status=dbm.OUTBOX_SENT, sent=now, last_error=None)
                else:
                    attempts = item.attempts + 1
                    delay = self.settings.outbox.backoff(attempts)
                    why = (getattr(outcome, "error", None) or error or
                           (f"status 0x{outcome.status:04X}" if outcome and outcome.status is not None else "failed"))
                    values.update(status=dbm.OUTBOX_PENDING, next_attempt=now + delay, last_error=str(why)[:2000])
                    log.warning("SR %s -> %s (%s@%s:%s) not delivered (try %d): %s; next try in %.1f s",
                                item.sr_sop_instance_uid, name, ae_title, host, port, attempts, why, delay)
                if item.id not in done:  # accepted ones were committed as they were answered
                    s.execute(update(OutboxItem).where(OutboxItem.id == item.id, OutboxItem.lease_owner == self.owner)
                              .values(**values))
                if ok:
                    self.sent += 1
                    log.info("SR %s of study %s delivered to %s (%.3f s)", item.sr_sop_instance_uid,
                             item.study_uid, name, elapsed)
