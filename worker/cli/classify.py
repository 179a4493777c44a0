"""`cxr-worker classify`: score files offline through exactly the server's scoring code.

A DICOM file gets the same header checks of the intended use as `serve` (worker/scoring/intended_use.py:
Modality, BodyPartExamined, ViewPosition, age); a JPEG/PNG has no header, so only the pixel check
(the checkpoint's out-of-distribution detector) applies to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, TextIO

from dicom_io import is_image_file

from ..scoring.intended_use import IntendedUse, NotAssessed, assess, check_header
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


def header_check(path: Path, use: IntendedUse) -> list[tuple[NotAssessed, str]]:
    """The header checks for a DICOM file ([] for JPEG/PNG, or a header that cannot be read: decoding reports it)."""
    if is_image_file(path):
        return []
    import pydicom

    from ..scoring.eligibility import HEADER_TAGS

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception:  # noqa: BLE001 - the decoder names what is wrong with the file
        return []
    return check_header(ds, use)


def record(scored: Scored, runner: ModelRunner, use: IntendedUse | None = None) -> dict:
    item = scored.prepared
    out: dict = {"path": str(item.path)}
    outside = header_check(Path(item.path), use) if use is not None else []
    verdict = assess(outside, scored.in_distribution, scored.probability is not None,
                     use or IntendedUse((), (), (), None, None))
    common = dict(assessed=verdict.assessed, not_assessed_reasons=list(verdict.reasons),
                  in_distribution=scored.in_distribution,
                  ood_score=round(scored.ood_score, 4) if scored.ood_score is not None else None,
                  ood_threshold=runner.ood_threshold)
    if runner.detector is None:
        common["ood"] = "no detector"
    if scored.probability is None:
        out.update(error=item.error_reason, message=item.error_message, **common)
        return out
    label, positive = runner.label(scored.probability)
    if not verdict.assessed:
        label, positive = "NOT_ASSESSED", None
    out.update(probability=round(scored.probability, 6), raw_probability=round(scored.raw_probability, 6),
               label=label, positive=positive, threshold=runner.threshold, **common,
               model=runner.info.name, model_version=runner.info.version)
    if verdict.flags:
        out["outside_intended_use"] = list(verdict.flags)
    if outside:
        out["intended_use_detail"] = "; ".join(detail for _, detail in outside)
    if item.transfer_syntax:
        out["transfer_syntax"] = item.transfer_syntax
    if item.number_of_frames > 1 or item.frame is not None:
        out.update(frame=item.frame, number_of_frames=item.number_of_frames)
    if item.notes:
        out["notes"] = item.notes
    return out


def write_heatmap(scored: Scored, runner: ModelRunner, rec: dict, folder: Path, taken: set[str],
                  size: int | None = None) -> None:
    """An assessed file's overlay as PNG in ``folder`` (named after the file; a repeated name gets
    -2, -3...), recorded as rec["heatmap"]; a file that was not assessed gets none (its map would
    explain a finding that was not made)."""
    rec["heatmap"] = None
    if not rec.get("assessed") or scored.cam is None or scored.prepared.preview is None:
        return
    from trainer.cam import relevance

    from ..heatmap.overlay import PICTURE_LONG_SIDE, key_picture, png_bytes

    name, n = f"{Path(scored.prepared.path).name}.png", 1
    while name in taken:
        n += 1
        name = f"{Path(scored.prepared.path).name}-{n}.png"
    taken.add(name)
    preview = scored.prepared.preview
    picture = key_picture(preview, relevance(scored.cam), finding=rec["label"], probability=scored.probability,
                          threshold=runner.threshold, model_name=runner.info.name, model_version=runner.info.version,
                          size=size or PICTURE_LONG_SIDE)
    target = folder / name
    target.write_bytes(png_bytes(picture))
    rec["heatmap"] = str(target)


def run(paths: list[str], runner: ModelRunner, as_json: bool, out: TextIO = sys.stdout,
        use: IntendedUse | None = None, heatmap_dir: Path | None = None, heatmap_size: int | None = None) -> int:
    """Print one line per file; return 0 when every file was scored, 1 otherwise (a file that was
    scored but not assessed is not a failure: its line says why). ``heatmap_dir``: also write each
    assessed file's overlay there, ``heatmap_size`` pixels on its long side (settings
    heatmap.key_image_size; None: overlay.PICTURE_LONG_SIDE; the runner made with ``heatmaps=True`` and the ``preview_box`` of
    worker.heatmap.overlay.film_box for that size)."""
    files = list(expand(paths))
    failures = 0
    taken: set[str] = set()
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        for scored in runner.score([(p, p) for p in chunk]):
            rec = record(scored, runner, use)
            if heatmap_dir is not None:
                write_heatmap(scored, runner, rec, heatmap_dir, taken, heatmap_size)
            failures += "error" in rec
            if as_json:
                out.write(json.dumps(rec) + "\n")
            elif "error" in rec:
                out.write(f"{rec['path']}\tERROR\t{rec['error']}: {rec['message']}\n")
            else:
                why = f"\t{','.join(rec['not_assessed_reasons'])}" if rec["not_assessed_reasons"] else ""
                out.write(f"{rec['path']}\t{rec['probability']:.4f}\t{rec['label']}{why}\n")
        out.flush()
    if not files:
        sys.stderr.write("classify: no files given\n")
        return 2
    return 1 if failures else 0
