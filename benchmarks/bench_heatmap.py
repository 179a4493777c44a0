#!/usr/bin/env python
"""ms per heatmap object at a flat-panel source size (2500 x 2048): the SEG (highdicom reference vs the
template path, RLE Lossless vs Explicit VR Little Endian, with bytes), the key picture, the RGB SC key
image and the strongest-region polygon.

    python benchmarks/bench_heatmap.py            # 40 objects per case
    python benchmarks/bench_heatmap.py --quick    # 10 per case (a few seconds)
    python benchmarks/bench_heatmap.py --quick --json heatmap.json

The sources are kept headers (pack_source/unpack_source of a DX header, no pixel data), as the
scorer has them; every object gets new UIDs and a new smooth map (a 7 x 7 map mapped back with
dicom_io.map_to_image, as the scorer makes it). Prints the median CPU time per object
(time.process_time; all of it is one thread) and the ratios against the highdicom reference
measured in the same run, plus the SR's own cost (bench_sr's fast path) for scale.
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
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from testkit.dicom_factory import DX_FOR_PRESENTATION_STORAGE, make_dataset, synthetic_radiograph  # noqa: E402

from dicom_io import map_to_image, shrink_within  # noqa: E402
from trainer.model_info import ModelInfo, new_model_uid  # noqa: E402
from worker.heatmap import build_key_image, encode, key_picture, strongest_region  # noqa: E402
from worker.heatmap.key_image import encode_key_image, key_image_template_info  # noqa: E402
from worker.heatmap.overlay import film_box  # noqa: E402
from worker.heatmap.segmentation import (  # noqa: E402
    build_segmentation, build_segmentation_reference, clear_segmentation_templates, encode_segmentation, map_levels,
    segmentation_template_info,
)
from worker.sr import PneumoniaReport, encode_pneumonia_sr, pack_source, unpack_source  # noqa: E402

FULL_REPEATS, QUICK_REPEATS = 40, 10
SOURCE_SIZE = (2500, 2048)  # rows, columns of the ingest benchmark's studies


def kept_header() -> pydicom.Dataset:
    """A DX header with the attributes a modality sends, as the receiver keeps it."""
    ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12, sop_class=DX_FOR_PRESENTATION_STORAGE)
    ds.Rows, ds.Columns = SOURCE_SIZE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "12345678", "Müller^Anna", "19800101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "A1234567", "1"
    ds.ReferringPhysicianName, ds.StudyDescription, ds.InstitutionName = "Doe^John", "XR CHEST PA", "General"
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "ACME", "DR-1", "ROOM1"
    ds.AcquisitionDateTime, ds.PatientOrientation, ds.ImagerPixelSpacing = "20240102101510", ["P", "F"], [0.139, 0.139]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return unpack_source(pack_source(pydicom.dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)))


def maps(count: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The maps as each path takes them: the 7 x 7 cells (the key picture's), the float map at the
    source's geometry (highdicom's), and its levels (map_levels: the template paths', the polygon's)."""
    rng = np.random.default_rng(0)
    cells, floats, levels = [], [], []
    for _ in range(count):
        cell = rng.random((7, 7)).astype(np.float32) ** 3
        cell /= cell.max()
        cells.append(cell)
        floats.append(np.clip(map_to_image(cell, *SOURCE_SIZE), 0.0, 1.0))
        levels.append(map_levels(cell, *SOURCE_SIZE))
    return cells, floats, levels


def median_ms(make: Callable[[int], object], repeats: int) -> float:
    times = []
    for index in range(repeats):
        start = time.process_time()
        make(index)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} objects per case")
    parser.add_argument("--repeats", type=int, help=f"objects per case (default {FULL_REPEATS})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here")
    args = parser.parse_args()
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    model = ModelInfo(arch="resnet18", name="cxr-pneumonia", version="1.1.0", threshold=0.42, uid=new_model_uid())
    header = kept_header()
    cells, floats, levels = maps(8)
    display = (synthetic_radiograph(*SOURCE_SIZE, bits_stored=12) >> 4).astype(np.uint8)
    rows: dict[str, dict] = {}

    def seg_maker(build, syntax, encoded=False) -> Callable[[int], bytes]:
        given = floats if build is build_segmentation_reference else levels  # as the scorer gives them
        def make(index: int) -> bytes:
            made = build(header, given[index % len(given)], model=model, series_uid=generate_uid(),
                         instance_uid=generate_uid(), series_number=9901, instance_number=index + 1,
                         manufacturer="cxr-worker", transfer_syntax_uid=syntax)
            return made if encoded else encode(made)
        return make

    print(f"{'object':<34} {'ms':>8} {'vs reference':>13} {'MB':>6}   (median CPU time of {repeats} each, "
          f"source {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]})")
    for syntax, name in ((RLELossless, "RLE Lossless"), (ExplicitVRLittleEndian, "Explicit VR LE")):
        reference, fast = seg_maker(build_segmentation_reference, syntax), seg_maker(build_segmentation, syntax)
        spliced = seg_maker(encode_segmentation, syntax, encoded=True)  # the scorer's path
        clear_segmentation_templates()
        reference(0), fast(0)  # highdicom's one-off tables, and the template
        size = len(fast(1)) / 1e6
        reference_ms, fast_ms, bytes_ms = (median_ms(reference, repeats), median_ms(fast, repeats),
                                           median_ms(spliced, repeats))
        info = segmentation_template_info()
        assert info["reference"] == 1 and info["byte_templates"] == 1, "the template was built again, or has no bytes"
        for label, ms in ((f"SEG {name}: highdicom", reference_ms), (f"SEG {name}: template", fast_ms),
                          (f"SEG {name}: byte template", bytes_ms)):
            print(f"{label:<34} {ms:>8.1f} {reference_ms / ms:>12.1f}x {size:>6.2f}")
        rows[f"seg {name}"] = {"reference_ms": reference_ms, "template_ms": fast_ms, "byte_template_ms": bytes_ms,
                               "mb": size, "ratio": reference_ms / bytes_ms}

    # every study with heatmaps on: its display image shrunk to the picture's film box (in decoding)
    preview_ms = median_ms(lambda index: shrink_within(display, film_box()), repeats)
    preview = shrink_within(display, film_box())

    def picture(index: int) -> np.ndarray:
        return key_picture(preview, cells[index % len(cells)], finding="Pneumonia", probability=0.9,
                           threshold=0.42, model_name=model.name, model_version=model.version)

    picture(0)
    shown = picture(1)
    picture_ms = median_ms(picture, repeats)

    def key_image(index: int) -> bytes:
        return encode(build_key_image(header, shown, model=model, series_uid=generate_uid(),
                                      instance_uid=generate_uid(), series_number=9902, instance_number=index + 1,
                                      manufacturer="cxr-worker"))

    def key_image_bytes(index: int) -> bytes:  # the scorer's path
        return encode_key_image(header, shown, model=model, series_uid=generate_uid(), instance_uid=generate_uid(),
                                series_number=9902, instance_number=index + 1, manufacturer="cxr-worker")[0]

    key_image(0), key_image_bytes(0)
    key_reference_ms, key_mb = median_ms(key_image, repeats), len(key_image(0)) / 1e6
    key_ms = median_ms(key_image_bytes, repeats)
    assert key_image_template_info() == {"templates": 1, "fallbacks": 0}, "no byte template for the key image"
    region_ms = median_ms(lambda index: strongest_region(levels[index % len(levels)]), repeats)

    def sr(index: int) -> bytes:
        return encode_pneumonia_sr(PneumoniaReport([header], 0.9, True, model, instance_number=index + 1,
                                                   sr_series_uid=generate_uid(), sr_instance_uid=generate_uid()))

    sr(0)
    sr_ms = median_ms(sr, repeats)
    for label, ms, mb in ((f"preview {preview.shape[1]}x{preview.shape[0]} (every study)", preview_ms, None),
                          (f"key picture {shown.shape[1]}x{shown.shape[0]}", picture_ms, None),
                          ("SC key image: highdicom", key_reference_ms, key_mb),
                          ("SC key image: byte template", key_ms, key_mb),
                          ("strongest-region polygon", region_ms, None), ("(for scale) the SR, fast path", sr_ms, None)):
        print(f"{label:<34} {ms:>8.1f} {'':>13} {'' if mb is None else f'{mb:.2f}':>6}")
    total = rows["seg RLE Lossless"]["byte_template_ms"] + picture_ms + key_ms + region_ms
    print(f"{'all heatmap objects of one image':<34} {total:>8.1f}   (the defaults: SEG RLE Lossless byte template + "
          "picture + SC byte template + polygon; the preview comes on top, for every study)")
    rows.update(preview_ms=preview_ms, picture_ms=picture_ms, key_image_reference_ms=key_reference_ms,
                key_image_ms=key_ms, key_image_mb=key_mb, region_ms=region_ms, sr_ms=sr_ms,
                total_ms=total)
    if args.json:
        args.json.write_text(json.dumps({"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
                                         "quick": args.quick, "repeats": repeats, "source": SOURCE_SIZE,
                                         "unit": "ms of CPU per object (median)", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
