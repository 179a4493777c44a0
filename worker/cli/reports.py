"""`cxr-worker results` and `cxr-worker status`: the read-only views of worker/store/overview.py as text,
JSON or CSV (the web pages of worker/http read the same functions)."""

from __future__ import annotations

import csv
import json
import sys
from typing import TextIO

from ..store.db import Database
from ..store.overview import RESULT_COLUMNS, result_rows, status_report  # noqa: F401 (the one home of the queries)


def print_results(db: Database, fmt: str, limit: int | None, out: TextIO = sys.stdout) -> int:
    rows = result_rows(db, limit)
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "reasons": json.dumps(row["reasons"]) if row["reasons"] else ""})
    else:
        out.write(f"{'created':19}  {'status':18}  {'prob':>6}  {'label':12}  {'sent':>4}  {'comm':>4}  study (accession)\n")
        for row in rows:
            prob = f"{row['probability']:.3f}" if row["probability"] is not None else "-"
            acc = f" ({row['accession']})" if row["accession"] else ""
            out.write(f"{row['created']:19}  {row['status']:18}  {prob:>6}  {row['label'] or '-':12}  "
                      f"{row['delivered']:>4}  {row['committed']:>4}  {row['study_uid']}{acc}\n")
        if not rows:
            out.write("(no results yet)\n")
    return 0


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
    for lease in report["leases"]:
        out.write(f"lease:    {lease['owner']}: {lease['studies']} studies, {lease['outbox']} SRs sending, "
                  f"expires in {lease['expires_in_s']} s\n")
    for e in report["last_errors"]:
        out.write(f"error:    study {e['study_uid']} [{e['status']}]: {e['error']}\n")
    for e in report["delivery_errors"]:
        out.write(f"delivery: SR {e['sr']} -> {e['destination']} after {e['attempts']} tries: {e['error']}\n")
    return 0
