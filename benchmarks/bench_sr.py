#!/usr/bin/env python
"""ms per pneumonia SR (build + encode to Part 10 bytes): highdicom reference vs the template path.

    python benchmarks/bench_sr.py            # 200 SRs per path and case
    python benchmarks/bench_sr.py --quick    # 30 per path and case (a few seconds)
    python benchmarks/bench_sr.py --quick --json sr.json   # also the results as JSON

Reference: build_pneumonia_sr + save_as (what ScorerLoop._write_sr did). Fast: encode_pneumonia_sr
with its template already built (the first study of a shape pays the reference once). Every SR gets
new SR UIDs, instance number and probability, as in the worker; the sources are DX headers read with
stop_before_pixels, like the ones the scorer reads. Prints the median per case and the ratio, in
CPU time of this process (time.process_time: the SR is pure Python on one thread, and CPU time is
what the worker's per-study budget is made of; it also holds up better than wall time on a busy
machine).

The "+ heatmap" rows: the same study with one HeatmapEvidence item per image (a 24-point closed
polygon, a Segmentation and a key image referenced), as a positive study with heatmaps on sends.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from testkit.dicom_factory import DX_FOR_PRESENTATION_STORAGE, make_dataset  # noqa: E402

from trainer.model_info import ModelInfo, new_model_uid  # noqa: E402
from worker.sr import (  # noqa: E402
    HeatmapEvidence,
    PneumoniaReport,
    ReferencedObject,
    build_pneumonia_sr,
    clear_template_cache,
    encode_pneumonia_sr,
    sr_file_bytes,
    template_cache_info,
)

FULL_REPEATS, QUICK_REPEATS = 200, 30
IMAGES_PER_CASE = (1, 2, 3)
EVIDENCE_CASES = (1, 2)  # images (each with one evidence item) of the "+ heatmap" rows
SEGMENTATION_STORAGE, SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"
DETECTOR_SIZE = (3000, 2500)  # rows, columns of a typical flat-panel chest DX (header only)


def dx_headers(count: int) -> list[pydicom.Dataset]:
    """`count` DX headers of one study, with the attributes a real modality sends, read back from bytes."""
    study_uid, series_uid = generate_uid(), generate_uid()
    headers = []
    for index in range(count):
        ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12, sop_class=DX_FOR_PRESENTATION_STORAGE)
        ds.Rows, ds.Columns = DETECTOR_SIZE
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "12345678", "Müller^Anna", "19800101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "A1234567", "1"
        ds.ReferringPhysicianName, ds.StudyDescription, ds.InstitutionName = "Doe^John", "XR CHEST PA LAT", "General"
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "ACME", "DR-1", ["4.1", "fw2"]
        ds.StationName, ds.AcquisitionDateTime = "ROOM1", "20240102101510.25"
        ds.PatientOrientation, ds.ImagerPixelSpacing = (["P", "F"], ["A", "F"])[index % 2], [0.139, 0.139]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        headers.append(pydicom.dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True))
    return headers


def evidence_item(source: pydicom.Dataset, probability: float) -> HeatmapEvidence:
    """One image's heatmap evidence: a 24-point closed polygon in the upper left lung, new objects."""
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    cx, cy, r = source.Columns * 0.3, source.Rows * 0.4, source.Columns * 0.1
    points = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a in angles]
    return HeatmapEvidence(source, points + points[:1], probability,
                           segmentation=ReferencedObject(SEGMENTATION_STORAGE, generate_uid(), generate_uid()),
                           key_image=ReferencedObject(SECONDARY_CAPTURE_STORAGE, generate_uid(), generate_uid(),
                                                      1024, 853))


def median_ms(make_sr: Callable[[int], bytes], repeats: int) -> float:
    times = []
    for index in range(repeats):
        start = time.process_time()
        make_sr(index)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} SRs per path and case")
    parser.add_argument("--repeats", type=int, help=f"SRs per path and case (default {FULL_REPEATS})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here")
    args = parser.parse_args()
    rows = []
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    model = ModelInfo(arch="simplecnn", name="cxr-pneumonia", version="1.0.0", threshold=0.42, uid=new_model_uid())

    def report(sources: list[pydicom.Dataset], index: int, heatmap: bool = False) -> PneumoniaReport:
        """A new probability, SR UIDs and instance number per SR, as in the worker."""
        # with heatmap evidence: a positive image (Present/Absent of each image is part of the shape)
        probability = 0.5 + (index % 97) / 194 if heatmap else (index % 97) / 97
        evidence = [evidence_item(ds, probability) for ds in sources] if heatmap else ()
        return PneumoniaReport(sources, probability, True, model, instance_number=index + 1,
                               sr_series_uid=generate_uid(), sr_instance_uid=generate_uid(), evidence=evidence)

    print(f"{'images':>14} {'reference ms':>13} {'fast ms':>8} {'ratio':>6}   (median CPU time of {repeats} SRs each)")
    for count, heatmap in [(c, False) for c in IMAGES_PER_CASE] + [(c, True) for c in EVIDENCE_CASES]:
        sources = dx_headers(count)

        def reference(index: int) -> bytes:
            return sr_file_bytes(build_pneumonia_sr(report(sources, index, heatmap)))

        def fast(index: int) -> bytes:
            return encode_pneumonia_sr(report(sources, index, heatmap))

        clear_template_cache()
        fast(0), reference(0)  # the template, and highdicom's one-off table loading
        before = template_cache_info()["template"]
        reference_ms, fast_ms = median_ms(reference, repeats), median_ms(fast, repeats)
        assert template_cache_info()["template"] - before == repeats, "fast path fell back to the reference"
        label = f"{count} + heatmap" if heatmap else str(count)
        print(f"{label:>14} {reference_ms:>13.2f} {fast_ms:>8.2f} {reference_ms / fast_ms:>5.0f}x")
        rows.append({"images": count, "heatmap_evidence": count if heatmap else 0,
                     "reference_ms": reference_ms, "fast_ms": fast_ms,
                     "ratio": reference_ms / fast_ms})
    if args.json:
        args.json.write_text(json.dumps({"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
                                         "quick": args.quick, "repeats": repeats, "unit": "ms of CPU per SR (median)",
                                         "results": rows}, indent=2))


if __name__ == "__main__":
    main()
