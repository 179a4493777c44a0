"""Read-only views of the database: what `cxr-worker status`/`results`, the web pages and /metrics show.

One home for these queries, so the CLI and the HTTP face (worker/http) never disagree. Nothing here
writes, and nothing returns patient name, ID or birth date (the database holds none; the study page
reads them from the spooled file only when ``http.show_patient_data`` is on).

``not_assessed_reason`` is the one place that says why a study got no probability.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, or_, select

from ..metrics import DatabaseGauges
from .db import Database, Instance, OutboxItem, OutboxState, Result, Study, StudyState

RESULT_COLUMNS = ["study_uid", "accession", "status", "revision", "probability", "label", "threshold",
                  "model_name", "model_version", "model_uid", "n_instances", "n_scored", "reasons", "error",
                  "decode_s", "inference_s", "sr_s", "total_s", "device", "sr_sop_instance_uid", "sr_path",
                  "delivered", "committed", "waiting", "created",
                  # intended use and calibration (#10): probability is calibrated, raw_probability the
                  # model's own; in_distribution from ood_score/ood_threshold (None: no detector)
                  "assessed", "not_assessed_reasons", "in_distribution", "ood_score", "ood_threshold",
                  "raw_probability", "outside_intended_use"]


def _stamp(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) if seconds else ""


def assessed(result) -> bool:
    """Whether the study's result states a finding. Rows from before #10 (``assessed`` NULL): when done or
    a probability was recorded."""
    flag = getattr(result, "assessed", None)
    if flag is not None:
        return bool(flag)
    return result.status == StudyState.DONE or getattr(result, "probability", None) is not None


def not_assessed_reasons(result) -> list[str]:
    """The coded reasons a study has no finding (``results.not_assessed_reasons``); empty when it has one.
    A failed study (e.g. its SR could not be built) gives its error's code. Rows from before #10: the
    skipped images' reasons (``Result.reasons``)."""
    if result is None:
        return []
    if result.status == StudyState.FAILED:
        first = (result.error or "").split(":")[0]
        return [first or StudyState.FAILED.value]
    if assessed(result):
        return []
    if getattr(result, "not_assessed_reasons", None):
        return json.loads(result.not_assessed_reasons)
    reasons = json.loads(result.reasons) if result.reasons else {}
    if reasons:
        return sorted(reasons)
    first = (result.error or result.status or "").split(":")[0]
    return [first] if first else []


def not_assessed_reason(result) -> str | None:
    """Why a study was not assessed, as the pages show it (the codes joined), or None when it was."""
    return ", ".join(not_assessed_reasons(result)) or None


# -- results (`cxr-worker results`) -----------------------------------------------------------------
def _delivery_counts(s, sr_uids=None) -> tuple[dict, dict, dict]:
    """Per SR: destinations that accepted it (sent, committing, committed), of those the ones that
    took responsibility (committed: storage commitment), and the ones still waiting."""
    def per_sr(condition):
        query = (select(OutboxItem.sr_sop_instance_uid, func.count()).where(condition)
                 .group_by(OutboxItem.sr_sop_instance_uid))
        if sr_uids is not None:
            query = query.where(OutboxItem.sr_sop_instance_uid.in_(sr_uids))
        return dict(s.execute(query).all())
    return (per_sr(OutboxItem.status.in_(OutboxState.delivered())),
            per_sr(OutboxItem.status == OutboxState.COMMITTED),
            per_sr(OutboxItem.status.not_in(OutboxState.delivered())))


def result_rows(db: Database, limit: int | None = None) -> list[dict]:
    with db.session() as s:
        query = select(Result).order_by(Result.created.desc(), Result.id.desc())
        if limit:
            query = query.limit(limit)
        results = s.scalars(query).all()
        sent, committed, waiting = _delivery_counts(s)
    rows = []
    for r in results:
        row = {c: getattr(r, c) for c in RESULT_COLUMNS if hasattr(r, c)}
        row["reasons"] = json.loads(r.reasons) if r.reasons else {}
        row["assessed"] = assessed(r)
        row["not_assessed_reasons"] = not_assessed_reasons(r)
        row["outside_intended_use"] = json.loads(r.outside_intended_use) if r.outside_intended_use else []
        row["in_distribution"] = (None if r.ood_score is None or r.ood_threshold is None
                                  else r.ood_score <= r.ood_threshold)
        row["delivered"] = sent.get(r.sr_sop_instance_uid, 0)       # destinations that accepted the SR
        row["committed"] = committed.get(r.sr_sop_instance_uid, 0)  # ... of which took responsibility
        row["waiting"] = waiting.get(r.sr_sop_instance_uid, 0)
        row["created"] = _stamp(r.created)
        rows.append(row)
    return rows


# -- status (`cxr-worker status`, the front page) ---------------------------------------------------
def status_report(db: Database) -> dict:
    with db.session() as s:
        studies = dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())
        outbox = dict(s.execute(select(OutboxItem.status, func.count()).group_by(OutboxItem.status)).all())
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
        skipped = dict(s.execute(select(Instance.reason, func.count()).where(Instance.eligible.is_(False))
                                 .group_by(Instance.reason)).all())
        models = [dict(name=n, version=v, uid=u, results=c) for n, v, u, c in s.execute(
            select(Result.model_name, Result.model_version, Result.model_uid, func.count())
            .group_by(Result.model_name, Result.model_version, Result.model_uid)).all()]
        not_assessed = Counter()
        for (codes,) in s.execute(select(Result.not_assessed_reasons).where(Result.assessed.is_(False))).all():
            not_assessed.update(json.loads(codes) if codes else ["unknown"])
        declined_studies = s.scalar(select(func.count()).select_from(Result).where(Result.assessed.is_(False))) or 0
        errors = [dict(study_uid=u, status=st, error=e) for u, st, e in s.execute(
            select(Study.study_uid, Study.status, Study.error).where(Study.error.is_not(None))
            .order_by(Study.updated.desc()).limit(5)).all()]
        delivery = [dict(sr=u, destination=d, attempts=a, error=e) for u, d, a, e in s.execute(
            select(OutboxItem.sr_sop_instance_uid, OutboxItem.destination, OutboxItem.attempts,
                   OutboxItem.last_error).where(OutboxItem.status != OutboxState.COMMITTED,  # sent + error: commitment
                                                OutboxItem.last_error.is_not(None))
            .order_by(OutboxItem.next_attempt).limit(5)).all()]
        leases = _leases(s)
    return {
        "database": db.engine.url.render_as_string(hide_password=True),
        "studies": {state.value: studies.get(state, 0) for state in StudyState},
        "instances": instances,
        "skipped_instances": skipped,
        # studies that got a "not analysed" SR, and how often each reason occurs among them
        "not_assessed_studies": declined_studies,
        "not_assessed_reasons": dict(sorted(not_assessed.items())),
        "outbox": {state.value: outbox.get(state, 0) for state in OutboxState},
        "models": models,
        "last_errors": errors,
        "delivery_errors": delivery,
        "leases": leases,
    }


def _leases(s) -> list[dict]:
    """Claims held now, per worker (lease owner ``host~id:pid:token``): scoring studies and SRs being
    sent, and when the earliest lease expires (negative: expired, waiting to be taken over). With
    several workers on one database this is every worker's, from any host."""
    now = time.time()
    held: dict[str, dict] = {}
    for table, state, key in ((Study, StudyState.SCORING, "studies"), (OutboxItem, OutboxState.SENDING, "outbox")):
        for owner, count, expires in s.execute(
                select(table.lease_owner, func.count(), func.min(table.lease_expires))
                .where(table.status == state, table.lease_owner.is_not(None)).group_by(table.lease_owner)).all():
            entry = held.setdefault(owner, {"owner": owner, "studies": 0, "outbox": 0, "expires_in_s": None})
            entry[key] = count
            left = round((expires or now) - now, 1)
            entry["expires_in_s"] = left if entry["expires_in_s"] is None else min(entry["expires_in_s"], left)
    return sorted(held.values(), key=lambda e: e["owner"])


# -- the pages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyRow:
    """One study as the front page lists it (no patient data)."""

    study_uid: str
    accession: str | None
    state: str
    received: str
    n_instances: int
    probability: float | None
    label: str | None
    not_assessed: str | None
    delivery: str
    error: str | None


def _delivery_state(sent: int, waiting: int, has_sr: bool, committed: int = 0) -> str:
    if not has_sr:
        return "-"
    if not sent and not waiting:
        return "kept (no destination)"
    return (f"sent {sent}/{sent + waiting}" + (f", {committed} committed" if committed else "")
            + (f", {waiting} waiting" if waiting else ""))


def _latest_results(s, study_uids) -> dict[str, Result]:
    latest: dict[str, Result] = {}
    for r in s.scalars(select(Result).where(Result.study_uid.in_(study_uids))
                       .order_by(Result.created.asc(), Result.id.asc())).all():
        latest[r.study_uid] = r
    return latest


def recent_studies(db: Database, limit: int = 50) -> list[StudyRow]:
    """The ``limit`` most recently received studies, newest first, with their latest result."""
    with db.session() as s:
        studies = s.scalars(select(Study).order_by(Study.last_received.desc(), Study.id.desc()).limit(limit)).all()
        results = _latest_results(s, [st.study_uid for st in studies]) if studies else {}
        sr_uids = [r.sr_sop_instance_uid for r in results.values() if r.sr_sop_instance_uid]
        sent, committed, waiting = _delivery_counts(s, sr_uids) if sr_uids else ({}, {}, {})
    rows = []
    for st in studies:
        r = results.get(st.study_uid)
        sr = r.sr_sop_instance_uid if r is not None else None
        rows.append(StudyRow(
            study_uid=st.study_uid, accession=st.accession, state=st.status, received=_stamp(st.last_received),
            n_instances=st.n_instances, probability=r.probability if r is not None else None,
            label=r.label if r is not None else None, not_assessed=not_assessed_reason(r),
            delivery=_delivery_state(sent.get(sr, 0), waiting.get(sr, 0), bool(sr), committed.get(sr, 0)),
            error=st.error))
    return rows


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    path: str
    transfer_syntax: str | None
    view_position: str | None
    eligible: bool
    reason: str | None
    probability: float | None


@dataclass(frozen=True)
class StudyDetail:
    row: StudyRow
    instances: list[InstanceRow]
    deliveries: list[dict]
    result: dict | None


def study_detail(db: Database, study_uid: str) -> StudyDetail | None:
    """One study, its instances, its latest result and deliveries; None when unknown."""
    with db.session() as s:
        st = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if st is None:
            return None
        r = _latest_results(s, [study_uid]).get(study_uid)
        instances = s.scalars(select(Instance).where(Instance.study_uid == study_uid)
                              .order_by(Instance.received, Instance.id)).all()
        deliveries = []
        if r is not None and r.sr_sop_instance_uid:
            deliveries = [dict(destination=o.destination, object=o.kind or "SR", state=o.status, attempts=o.attempts,
                               error=o.last_error, sent=_stamp(o.sent)) for o in s.scalars(
                select(OutboxItem).where(or_(OutboxItem.sr_sop_instance_uid == r.sr_sop_instance_uid,
                                             OutboxItem.evidence_for == r.sr_sop_instance_uid))
                .order_by(OutboxItem.destination, OutboxItem.id)).all()]  # per destination: objects, then the SR
    srs = [d for d in deliveries if d["object"] == "SR"]  # the study's delivery state is its SR's
    sent = sum(1 for d in srs if d["state"] in OutboxState.delivered())
    committed = sum(1 for d in srs if d["state"] == OutboxState.COMMITTED)
    row = StudyRow(study_uid=st.study_uid, accession=st.accession, state=st.status,
                   received=_stamp(st.last_received), n_instances=st.n_instances,
                   probability=r.probability if r is not None else None, label=r.label if r is not None else None,
                   not_assessed=not_assessed_reason(r),
                   delivery=_delivery_state(sent, len(srs) - sent, bool(r is not None and r.sr_sop_instance_uid),
                                            committed),
                   error=st.error)
    result = None
    if r is not None:
        result = dict(status=r.status, revision=r.revision, probability=r.probability, label=r.label,
                      threshold=r.threshold, model=f"{r.model_name} {r.model_version}", model_uid=r.model_uid,
                      n_scored=r.n_scored, n_instances=r.n_instances, best_instance_uid=r.best_instance_uid,
                      created=_stamp(r.created), error=r.error)
    return StudyDetail(row, [InstanceRow(i.sop_instance_uid, i.path, i.transfer_syntax, i.view_position, i.eligible,
                                         i.reason, i.probability) for i in instances], deliveries, result)


def instance_path(db: Database, study_uid: str, sop_uid: str) -> str | None:
    """The spool path of one instance of one study, or None."""
    with db.engine.connect() as conn:
        return conn.scalar(select(Instance.path).where(Instance.study_uid == study_uid,
                                                       Instance.sop_instance_uid == sop_uid))


# -- /metrics (read at scrape time) ----------------------------------------------------------------
def gauges(db: Database, now: float | None = None) -> DatabaseGauges:
    """Studies by state, outbox rows by destination and state, oldest waiting SR per destination."""
    now = time.time() if now is None else now
    with db.engine.connect() as conn:
        studies = dict(conn.execute(select(Study.status, func.count()).group_by(Study.status)).all())
        outbox = {(d, st): c for d, st, c in conn.execute(
            select(OutboxItem.destination, OutboxItem.status, func.count())
            .group_by(OutboxItem.destination, OutboxItem.status)).all()}
        oldest = dict(conn.execute(select(OutboxItem.destination, func.min(OutboxItem.created))
                                   .where(OutboxItem.status.not_in(OutboxState.delivered()))
                                   .group_by(OutboxItem.destination)).all())
    destinations = {d for d, _ in outbox}
    return DatabaseGauges(
        studies={state.value: studies.get(state, 0) for state in StudyState},
        outbox=outbox,
        oldest_waiting={d: max(0.0, now - oldest[d]) if oldest.get(d) is not None else 0.0 for d in destinations})


def ping(db: Database) -> None:
    """One round trip to the database (readiness); raises when it is unreachable."""
    with db.engine.connect() as conn:
        conn.execute(select(1)).scalar()
