"""`cxr-worker serve`: wire listener, scorer and outbox together; start and stop cleanly.

Start: umask 077, data directory (0700), database (tables created), leftovers of a crash cleaned
and claims of dead local workers returned to the queue, model loaded, then the listener opens.
`cxr-worker serve` (worker/cli/main.py) first binds the listening address once and reads the model
file's header, before this module (and torch) is imported: a busy port or a missing or invalid
model is one line naming network.port / model.path within a second, not an error after the load.
Stop (SIGTERM / SIGINT / Ctrl-C): stop accepting, let running associations finish, let the
scorer finish its current batch and the sender its current delivery, exit 0. Whatever was not
finished stays in the database and is picked up by the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .store import db as dbm
from .store.db import Database
from .outbox_loop import OutboxLoop
from .scorer_loop import ScorerLoop
from .scoring.runner import ModelRunner
from .net import install as install_pynetdicom
from .net.listener import Listener
from .receiver import Receiver
from .settings import Settings
from .store.spool import Spool
from .store.outbox import CommitmentReport, Recorded, record_commitment
from .store.studies import reclaim_stale
from .net.tls import server_context

log = logging.getLogger("cxr_worker.service")


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.owner = dbm.new_owner()
        os.umask(0o077)
        # TLS files are loaded first: a bad certificate stops start-up (SettingsError, exit 2).
        self.ssl_context = server_context(settings.tls) if settings.tls.enabled else None
        self.spool = Spool(settings.storage.data_dir)
        # pynetdicom set up for this process, before the slow steps: an untested pynetdicom version
        # stops start-up here (UnsupportedDependency, exit 2).
        install_pynetdicom(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=self.spool.incoming)
        removed = self.spool.clean_incoming()
        if removed:
            log.info("removed %d partial receptions left by a previous run", removed)
        self.db = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
        reclaimed = reclaim_stale(self.db)
        if reclaimed:
            log.info("re-queued %d studies/deliveries claimed by a worker that is gone", reclaimed)
        m = settings.model
        self.runner = ModelRunner(m.path, m.device, m.precision, m.batch_size, m.decode_threads, m.decode_processes,
                             m.torch_threads)
        self.receiver = Receiver(settings, self.db, self.spool)
        self.sr_ready = threading.Event()  # scorer -> outbox: an SR was committed, send it now
        self.listener = Listener(settings, self.receiver, self.ssl_context, commitments=self._commitment_report)
        self.scorer_loop = ScorerLoop(settings, self.db, self.spool, self.runner, self.owner, self.stop_event,
                                      on_committed=self.sr_ready.set)
        self.outbox_loop = OutboxLoop(settings, self.db, self.owner, self.stop_event, wake=self.sr_ready)
        self.port: int | None = None

    def _commitment_report(self, report: CommitmentReport) -> Recorded:
        """A Storage Commitment report (the listener's thread): recorded; SRs it lists as failed are
        sent again at once."""
        recorded = record_commitment(self.db, report)
        if recorded.resend:
            self.sr_ready.set()
        return recorded

    def start(self) -> int:
        self.scorer_loop.warm_up()
        self.scorer_loop.start()
        self.outbox_loop.start()
        self.port = self.listener.start()
        return self.port

    def stop(self, grace: float = 30.0) -> None:
        log.info("stopping: no new associations; finishing work in flight")
        self.listener.stop(grace)
        self.stop_event.set()
        self.sr_ready.set()  # the outbox sleeps on it
        for thread in (self.scorer_loop, self.outbox_loop):
            thread.join(timeout=grace)
            if thread.is_alive():
                log.warning("%s thread still busy after %.0f s; its claim will be re-taken on restart",
                            thread.name, grace)
        self.runner.close()
        self.db.dispose()
        log.info("stopped (received %d, duplicates %d, replaced %d, rejected %d, studies scored %d, "
                 "SRs delivered %d)", self.receiver.received, self.receiver.duplicates, self.receiver.replaced,
                 self.receiver.rejected, self.scorer_loop.scored_studies, self.outbox_loop.sent)

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (0 on a clean stop)."""
        requested = threading.Event()

        def on_signal(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            requested.set()

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not requested.wait(1.0):
                if not (self.scorer_loop.is_alive() and self.outbox_loop.is_alive()):
                    log.error("a worker thread died; stopping")
                    break
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            started = time.monotonic()
            self.stop()
            log.debug("stop took %.2f s", time.monotonic() - started)
        return 0
