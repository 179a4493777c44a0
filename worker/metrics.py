"""Every Prometheus metric of the worker, in one place (served at /metrics by worker/http).

A leaf: it imports only prometheus_client. ``Metrics`` owns its own ``CollectorRegistry`` (not the
process-wide default), so a service, a test or a benchmark running in the same process never count
into each other's figures. The flows record what happens where it happens (receiver, scorer loop,
outbox loop) through the methods below; what the database knows (studies by state, outbox depth and
the age of its oldest waiting item) is read from it at scrape time by ``DatabaseCollector`` through a
function the service hands in (worker/store/overview.py ``gauges``), so the figures are those of the
database shared by every worker, and nothing is counted twice across restarts.

Decode time is recorded in the service process from each decoded item's ``Prepared`` (its
``decode_s`` and ``transfer_syntax``): the decode processes have their own memory and cannot update
this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "cxr_worker"
#: Seconds: a C-STORE to an SR spans ~50 ms (one film on a GPU) to minutes (quiet period, a busy CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: Seconds one image takes to decode (JPEG baseline ~20 ms, JPEG Lossless of a 2500x2048 film ~150 ms).
DECODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Outcome(StrEnum):
    """``cxr_worker_instances_received_total{outcome}``: what became of a received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"
    REJECTED = "rejected"   # 0xC000: unreadable, kept in rejected/
    REFUSED = "refused"     # 0xA700: not kept (disk below the watermark, spool or database failure)


@dataclass(frozen=True)
class DatabaseGauges:
    """What ``DatabaseCollector`` reads from the database at scrape time."""

    studies: Mapping[str, int]                              # state -> count
    outbox: Mapping[tuple[str, str], int]                   # (destination, state) -> count
    oldest_waiting: Mapping[str, float] = field(default_factory=dict)  # destination -> seconds


class DatabaseCollector(Collector):
    """Studies by state and the outbox per destination, read from the database when scraped.

    A scrape while the database is unreachable yields only ``cxr_worker_database_up 0``.
    """

    def __init__(self, read: Callable[[], DatabaseGauges]) -> None:
        self.read = read

    def collect(self) -> Iterable:
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 when the last scrape could read the database")
        try:
            gauges = self.read()
        except Exception:  # noqa: BLE001 - a scrape never fails because the database is gone
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Studies by state (from the database)", labels=["state"])
        for state, count in sorted(gauges.studies.items()):
            studies.add_metric([state], count)
        yield studies
        outbox = GaugeMetricFamily(f"{PREFIX}_outbox_items", "Outbox rows (one file, an SR or a heatmap object, for one destination) by state",
                                   labels=["destination", "state"])
        for (destination, state), count in sorted(gauges.outbox.items()):
            outbox.add_metric([destination, state], count)
        yield outbox
        oldest = GaugeMetricFamily(f"{PREFIX}_outbox_oldest_waiting_seconds",
                                   "Age of the oldest SR not yet delivered, per destination (0 when none waits)",
                                   labels=["destination"])
        for destination, age in sorted(gauges.oldest_waiting.items()):
            oldest.add_metric([destination], age)
        yield oldest


class Metrics:
    """The worker's metrics in a registry of its own; one per service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            f"{PREFIX}_instances_received", "Received C-STORE instances by outcome and reason "
            "(reason empty for stored/duplicate/replaced)", ["outcome", "reason"], registry=r)
        self._received: dict[tuple[Outcome, str], Counter] = {}
        self.studies_scored = Counter(
            f"{PREFIX}_studies_scored", "Studies whose result was committed, by verdict", ["status"], registry=r)
        self.declined = Counter(
            f"{PREFIX}_instances_declined", "Images of scored studies that were not assessed, by reason "
            "(header check, decoding, out of distribution)", ["reason"], registry=r)
        self.studies_not_assessed = Counter(
            f"{PREFIX}_studies_not_assessed", "Studies that got a 'not analysed' SR, by coded reason (a study "
            "counts once under each of its reasons)", ["reason"], registry=r)
        self.scoring_seconds = Histogram(
            f"{PREFIX}_scoring_seconds", "Claim of a study to its committed result", registry=r,
            buckets=LATENCY_BUCKETS)
        self.end_to_end_seconds = Histogram(
            f"{PREFIX}_end_to_end_seconds", "First received instance of a study to its committed result "
            "(includes studies.quiet_seconds)", registry=r, buckets=LATENCY_BUCKETS)
        self.decode_seconds = Histogram(
            f"{PREFIX}_decode_seconds", "Decoding one image to model input, by transfer syntax UID",
            ["transfer_syntax"], registry=r, buckets=DECODE_BUCKETS)
        self.deliveries = Counter(
            f"{PREFIX}_deliveries", "SRs accepted by a destination", ["destination"], registry=r)
        self.delivery_failures = Counter(
            f"{PREFIX}_delivery_failures", "Failed delivery tries (each retried with backoff)", ["destination"],
            registry=r)
        self.model = Info(f"{PREFIX}_model", "The loaded model", registry=r)
        self.spool_free_bytes = Gauge(
            f"{PREFIX}_spool_free_bytes", "Free bytes on the data directory's filesystem", registry=r)
        self.spool_min_free_bytes = Gauge(
            f"{PREFIX}_spool_min_free_bytes", "storage.min_free_bytes (0 = watermark off)", registry=r)
        self.spool_below_watermark = Gauge(
            f"{PREFIX}_spool_below_watermark", "1 while C-STOREs are refused for lack of disk space", registry=r)

    # -- recording (the flows call these where things happen) -------------------------------------
    def received(self, outcome: Outcome, reason: str = "") -> None:
        child = self._received.get((outcome, reason))
        if child is None:  # labels() costs ~5 us; the children are kept (a handful of label pairs)
            child = self._received[(outcome, reason)] = self.instances_received.labels(outcome.value, reason)
        child.inc()

    def decoded(self, transfer_syntax: str | None, seconds: float) -> None:
        self.decode_seconds.labels(transfer_syntax or "none").observe(seconds)

    def study_concluded(self, status: str, scoring_s: float, end_to_end_s: float | None,
                        declined: Mapping[str, int], not_assessed: Sequence[str] = ()) -> None:
        self.studies_scored.labels(status).inc()
        self.scoring_seconds.observe(max(0.0, scoring_s))
        if end_to_end_s is not None:
            self.end_to_end_seconds.observe(max(0.0, end_to_end_s))
        for reason, count in declined.items():
            self.declined.labels(reason).inc(count)
        for reason in not_assessed:
            self.studies_not_assessed.labels(reason).inc()

    def delivered(self, destination: str) -> None:
        self.deliveries.labels(destination).inc()

    def delivery_failed(self, destination: str) -> None:
        self.delivery_failures.labels(destination).inc()

    # -- wiring -----------------------------------------------------------------------------------
    def set_model(self, name: str, version: str, uid: str) -> None:
        self.model.info({"name": name, "version": version, "uid": uid})

    def watch_free_space(self, measure: Callable[[], tuple[int, int]]) -> None:
        """``measure()`` -> (free bytes, min free bytes), read at scrape time."""
        self.spool_free_bytes.set_function(lambda: measure()[0])
        self.spool_min_free_bytes.set_function(lambda: measure()[1])
        self.spool_below_watermark.set_function(lambda: float(0 < measure()[1] and measure()[0] < measure()[1]))

    def watch_database(self, read: Callable[[], DatabaseGauges]) -> None:
        self.registry.register(DatabaseCollector(read))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
