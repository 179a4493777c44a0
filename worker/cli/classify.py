"""`cxr-worker classify`: score files offline through exactly the server's scoring code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, TextIO

from ..scoring.runner import Scored, ModelRunner

CHUNK = 64  # files decoded and scored per round, so output streams for long lists


def expand(paths: list[str]) -> Iterator[Path]:
    """Files as given; directories are walked (sorted) for every file in them."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


def record(scored: Scored, runner: ModelRunner) -> dict:
    item = scored.prepared
    out: dict = {"path": str(item.path)}
    if scored.probability is None:
        out.update(error=item.error_reason, message=item.error_message)
        return out
    label, positive = runner.label(scored.probability)
    out.update(probability=round(scored.probability, 6), label=label, positive=positive,
               threshold=runner.threshold, model=runner.info.name, model_version=runner.info.version)
    if item.transfer_syntax:
        out["transfer_syntax"] = item.transfer_syntax
    if item.number_of_frames > 1 or item.frame is not None:
        out.update(frame=item.frame, number_of_frames=item.number_of_frames)
    if item.notes:
        out["notes"] = item.notes
    return out


def run(paths: list[str], runner: ModelRunner, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print one line per file; return 0 when every file was scored, 1 otherwise."""
    files = list(expand(paths))
    failures = 0
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        for scored in runner.score([(p, p) for p in chunk]):
            rec = record(scored, runner)
            failures += "error" in rec
            if as_json:
                out.write(json.dumps(rec) + "\n")
            elif "error" in rec:
                out.write(f"{rec['path']}\tERROR\t{rec['error']}: {rec['message']}\n")
            else:
                out.write(f"{rec['path']}\t{rec['probability']:.4f}\t{rec['label']}\n")
        out.flush()
    if not files:
        sys.stderr.write("classify: no files given\n")
        return 2
    return 1 if failures else 0
