"""`cxr-worker serve`: wire listener, scorer and outbox together; start and stop cleanly.

Start: umask 077, data directory (0700), this worker's own incoming/<owner>/ (locked while it lives)
and the data_dir checks (SQLite: no second live worker; the filesystem: hard links, atomic rename,
fsync), database (tables created), leftovers of crashed workers cleaned and claims of dead local
workers returned to the queue, model loaded, then the listener opens.
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

from .metrics import Metrics
from .store import db as dbm
from .store import overview
from .store.db import Database
from .outbox_loop import OutboxLoop
from .scorer_loop import ScorerLoop
from .scoring.runner import ModelRunner
from .net import install as install_pynetdicom
from .net.listener import Listener
from .receiver import Receiver
from .errors import SettingsError
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
        self.spool = Spool(settings.storage.data_dir, settings.storage.min_free_bytes)
        self.metrics = Metrics()  # this service's own registry (served at /metrics)
        self._check_data_dir(settings)
        # pynetdicom set up for this process, before the slow steps: an untested pynetdicom version
        # stops start-up here (UnsupportedDependency, exit 2).
        install_pynetdicom(writeback_bytes=settings.storage.writeback_bytes, incoming_dir=self.spool.incoming,
                          refuse=self.spool.watermark.refusal)
        removed = self.spool.clean_incoming()
        if removed:
            log.info("removed %d partial receptions left by workers that are gone", removed)
        self.db = Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)
        reclaimed = reclaim_stale(self.db)
        if reclaimed:
            log.info("re-queued %d studies/deliveries claimed by a worker that is gone", reclaimed)
        m = settings.model
        h = settings.heatmap
        from .heatmap.overlay import film_box

        self.runner = ModelRunner(m.path, m.device, m.precision, m.batch_size, m.decode_threads, m.decode_processes,
                                  m.torch_threads, heatmaps=h.enabled,
                                  preview_box=film_box(h.key_image_size) if h.enabled else None,
                                  preview_dir=self.spool.previews() if h.enabled else None)
        self.metrics.set_model(self.runner.info.name, self.runner.info.version, self.runner.info.uid)
        self.metrics.watch_database(lambda: overview.gauges(self.db))
        self.metrics.watch_free_space(self._free_space)
        self.receiver = Receiver(settings, self.db, self.spool, self.metrics)
        self.sr_ready = threading.Event()  # scorer -> outbox: an SR was committed, send it now
        self.listener = Listener(settings, self.receiver, self.ssl_context, commitments=self._commitment_report)
        self.scorer_loop = ScorerLoop(settings, self.db, self.spool, self.runner, self.owner, self.stop_event,
                                      on_committed=self.sr_ready.set, metrics=self.metrics)
        self.outbox_loop = OutboxLoop(settings, self.db, self.owner, self.stop_event, wake=self.sr_ready,
                                      metrics=self.metrics)
        self.port: int | None = None
        self.http = self._http_server() if settings.http.enabled else None

    def _free_space(self) -> tuple[int, int]:
        space = self.spool.watermark.measure()
        return space.free_bytes, space.min_free_bytes

    def _http_server(self):
        """The HTTP face (worker/http), its socket bound now: a busy http.port stops start-up here."""
        from .http import Face, HTTPServer, Readiness, build_app

        readiness = Readiness(self.db, self.spool.watermark, model_loaded=lambda: self.runner.model is not None,
                              listener_accepting=self.listener.accepting,
                              flows_alive=lambda: {"scorer": self.scorer_loop.is_alive(),
                                                   "outbox": self.outbox_loop.is_alive()})
        info = self.runner.info
        face = Face(self.settings, self.db, self.spool, self.metrics, readiness,
                    model={"name": info.name, "version": info.version, "uid": info.uid})
        return HTTPServer(build_app(face), self.settings)

    def _check_data_dir(self, settings: Settings) -> None:
        """This worker's own incoming/<owner>/ (locked while it lives), then the checks that let several
        workers share data_dir: SQLite refuses a second live worker; the filesystem must give hard
        links, atomic renames and fsync (store/spool.Spool.check_filesystem). SettingsError, exit 2."""
        self.spool.take_incoming(self.owner)
        shared = not settings.storage.url.startswith("sqlite")
        others = self.spool.live_workers()
        try:
            if others and not shared:
                raise SettingsError(
                    f"storage.database_url: another cxr-worker is serving {self.spool.root} ({others[0]}) with "
                    "SQLite; several workers on one data_dir need PostgreSQL (storage.database_url = "
                    "'postgresql+psycopg://...'; docs/deployment.md)")
            self.spool.check_filesystem(require_hard_links=shared)
        except SettingsError:
            self.spool.release_incoming()  # refused: leave no folder behind
            raise
        if others:
            log.info("sharing %s with %d other running worker(s)", self.spool.root, len(others))

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
        if self.http is not None:
            self.http.start()  # /readyz says "listener not accepting" until the next line
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
        if self.http is not None:
            self.http.stop()
        self.runner.close()
        self.db.dispose()
        self.spool.release_incoming()
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
