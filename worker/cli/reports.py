"""`cxr-worker results` and `cxr-worker status`: read-only views of the database."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from typing import TextIO

from sqlalchemy import func, select

from ..store.db import Database, Instance, OutboxItem, OutboxState, Result, Study, StudyState

RESULT_COLUMNS = ["study_uid", "accession", "status", "revision", "probability", "label", "threshold",
                  "model_name", "model_version", "model_uid", "n_instances", "n_scored", "reasons", "error",
                  "decode_s", "inference_s", "sr_s", "total_s", "device", "sr_sop_instance_uid", "sr_path",
                  "delivered", "waiting", "created",
                  # intended use and calibration (#10): probability is calibrated, raw_probability the
                  # model's own; in_distribution from ood_score/ood_threshold (None: no detector)
                  "assessed", "not_assessed_reasons", "in_distribution", "ood_score", "ood_threshold",
                  "raw_probability", "outside_intended_use"]


def result_rows(db: Database, limit: int | None = None) -> list[dict]:
    with db.session() as s:
        query = select(Result).order_by(Result.created.desc(), Result.id.desc())
        if limit:
            query = query.limit(limit)
        results = s.scalars(query).all()
        sent = dict(s.execute(select(OutboxItem.sr_sop_instance_uid, func.count())
                              .where(OutboxItem.status == OutboxState.SENT)
                              .group_by(OutboxItem.sr_sop_instance_uid)).all())
        waiting = dict(s.execute(select(OutboxItem.sr_sop_instance_uid, func.count())
                                 .where(OutboxItem.status != OutboxState.SENT)
                                 .group_by(OutboxItem.sr_sop_instance_uid)).all())
    rows = []
    for r in results:
        row = {c: getattr(r, c) for c in RESULT_COLUMNS if hasattr(r, c)}
        row["reasons"] = json.loads(r.reasons) if r.reasons else {}
        # rows from before #10 (NULL): assessed when a probability was recorded
        row["assessed"] = bool(r.assessed) if r.assessed is not None else r.probability is not None
        row["not_assessed_reasons"] = json.loads(r.not_assessed_reasons) if r.not_assessed_reasons else []
        row["outside_intended_use"] = json.loads(r.outside_intended_use) if r.outside_intended_use else []
        row["in_distribution"] = (None if r.ood_score is None or r.ood_threshold is None
                                  else r.ood_score <= r.ood_threshold)
        row["delivered"] = sent.get(r.sr_sop_instance_uid, 0)
        row["waiting"] = waiting.get(r.sr_sop_instance_uid, 0)
        row["created"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(r.created))
        rows.append(row)
    return rows


def print_results(db: Database, fmt: str, limit: int | None, out: TextIO = sys.stdout) -> int:
    rows = result_rows(db, limit)
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "reasons": json.dumps(row["reasons"]) if row["reasons"] else "",
                             "not_assessed_reasons": " ".join(row["not_assessed_reasons"]),
                             "outside_intended_use": " ".join(row["outside_intended_use"])})
    else:
        out.write(f"{'created':19}  {'status':18}  {'prob':>6}  {'label':9}  {'sent':>4}  study (accession)\n")
        for row in rows:
            prob = f"{row['probability']:.3f}" if row["probability"] is not None else "-"
            acc = f" ({row['accession']})" if row["accession"] else ""
            out.write(f"{row['created']:19}  {row['status']:18}  {prob:>6}  {row['label'] or '-':9}  "
                      f"{row['delivered']:>4}  {row['study_uid']}{acc}\n")
        if not rows:
            out.write("(no results yet)\n")
    return 0


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
                   OutboxItem.last_error).where(OutboxItem.status != OutboxState.SENT,
                                                OutboxItem.last_error.is_not(None))
            .order_by(OutboxItem.next_attempt).limit(5)).all()]
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
    }


def print_status(db: Database, as_json: bool, out: TextIO = sys.stdout) -> int:
    report = status_report(db)
    if as_json:
        out.write(json.dumps(report) + "\n")
        return 0
    out.write(f"database: {report['database']}\n")
    out.write("studies:  " + "  ".join(f"{k}={v}" for k, v in report["studies"].items()) + "\n")
    out.write(f"instances: {report['instances']}  skipped: "
              + (", ".join(f"{k}={v}" for k, v in report["skipped_instances"].items()) or "none") + "\n")
    out.write(f"not assessed: {report['not_assessed_studies']} studies"
              + (" (" + ", ".join(f"{k}={v}" for k, v in report["not_assessed_reasons"].items()) + ")"
                 if report["not_assessed_reasons"] else "") + "\n")
    out.write("outbox:   " + "  ".join(f"{k}={v}" for k, v in report["outbox"].items()) + "\n")
    for m in report["models"]:
        out.write(f"model:    {m['name']} {m['version']} ({m['uid']}): {m['results']} results\n")
    for e in report["last_errors"]:
        out.write(f"error:    study {e['study_uid']} [{e['status']}]: {e['error']}\n")
    for e in report["delivery_errors"]:
        out.write(f"delivery: SR {e['sr']} -> {e['destination']} after {e['attempts']} tries: {e['error']}\n")
    return 0
