#!/usr/bin/env python
"""Realistic single-image chest studies for the ingest benchmark.

Each study is one DX (For Presentation) or CR image, 2500 x 2048, 12 bits stored in 16
(MONOCHROME2, window in the header), made from a real Kaggle chest JPEG: upscaled (bicubic), mapped
to 12 bits through a linear window, plus mild Gaussian noise so compression is not trivial (JPEG
Lossless gets roughly 2-3:1 on it, like a real CR/DX). Two encodings of the same pixels:

    explicit   uncompressed Explicit VR Little Endian (1.2.840.10008.1.2.1), ~10.2 MB a file
    jpegll     JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1, 1.2.840.10008.1.2.4.70),
               encoded by DCMTK `dcmcjpeg +e1` (an independent encoder)

The expensive part (pixels, JPEG encoding) is done once into a cache of templates; every call of
write_studies() then gives each study new Study/Series/SOP Instance UIDs, accession and patient
IDs, so every run sends studies no receiver has seen.

    python benchmarks/make_study_files.py --out /tmp/studies -n 20            # both encodings
    python benchmarks/make_study_files.py --out /tmp/studies -n 5 --syntax jpegll
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray224" / "train"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxr-worker-bench"

ROWS, COLS = 2500, 2048
BITS_STORED = 12
LOW, HIGH = 200, 3900          # 8-bit 0..255 maps linearly onto these 12-bit values
NOISE_SIGMA = 6.0              # DN (of 4095): mild detector-like noise
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "jpegll": JPEGLosslessSV1}
TEMPLATE_VERSION = "v1"


def dcmtk_tool(name: str) -> str:
    """The DCMTK binary (prefer /usr/bin: pynetdicom installs a Python `storescu`/`storescp` too)."""
    for candidate in (Path("/usr/bin") / name, Path("/usr/local/bin") / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"DCMTK `{name}` not found (apt-get install -y dcmtk)")
    head = Path(found).read_bytes()[:64]
    if head.startswith(b"#!"):
        raise SystemExit(f"`{found}` is a script (pynetdicom's?), not DCMTK's {name}; install dcmtk")
    return found


def kaggle_sources(root: Path, count: int) -> list[Path]:
    files = sorted(root.glob("PNEUMONIA/*.jp*g"))[: (count + 1) // 2] + sorted(root.glob("NORMAL/*.jp*g"))[: count // 2]
    if len(files) < count:
        raise SystemExit(f"need {count} JPEGs under {root}/{{NORMAL,PNEUMONIA}}, found {len(files)}")
    return files


def radiograph_pixels(jpeg: Path, seed: int) -> np.ndarray:
    """Kaggle JPEG -> uint16 2500x2048 with 12 significant bits (window [LOW, HIGH]) + noise."""
    gray = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError(f"cannot read {jpeg}")
    big = cv2.resize(gray, (COLS, ROWS), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    values = LOW + big * ((HIGH - LOW) / 255.0)
    values += np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, size=values.shape).astype(np.float32)
    return np.clip(np.rint(values), 0, (1 << BITS_STORED) - 1).astype(np.uint16)


def build_dataset(pixels: np.ndarray, sop_class: str = DX_PRESENTATION) -> Dataset:
    """A complete DX/CR For Presentation chest PA file dataset (UIDs filled in by restamp())."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    is_dx = sop_class == DX_PRESENTATION
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if is_dx else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    now = dt.datetime.now()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "BENCH0"
    ds.Modality = "DX" if is_dx else "CR"
    ds.Manufacturer = "cxr-worker benchmark"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "PA"
    ds.PatientName = "BENCH^PATIENT"
    ds.PatientID = "BENCH0"
    ds.PatientBirthDate = "19700101"  # restamp makes every study's patient a child of 3
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.168, 0.168]
    if is_dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = (LOW + HIGH) / 2
    ds.WindowWidth = HIGH - LOW
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _make_template(job: tuple[int, str, str, str, str]) -> tuple[int, float, float]:
    index, jpeg, out_dir, sop_class, dcmcjpeg = job
    out = Path(out_dir)
    explicit = out / f"{index:05d}-explicit.dcm"
    jpegll = out / f"{index:05d}-jpegll.dcm"
    start = time.perf_counter()
    ds = build_dataset(radiograph_pixels(Path(jpeg), seed=index), sop_class)
    tmp = explicit.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(explicit)
    made = time.perf_counter() - start
    start = time.perf_counter()
    tmp = jpegll.with_suffix(".tmp")
    subprocess.run([dcmcjpeg, "+e1", str(explicit), str(tmp)], check=True, capture_output=True, timeout=300)
    tmp.replace(jpegll)
    return index, made, time.perf_counter() - start


def ensure_templates(count: int, cache: Path = DEFAULT_CACHE, data: Path = DEFAULT_DATA, sop_class: str = DX_PRESENTATION,
                     workers: int | None = None, quiet: bool = False) -> Path:
    """Make sure ``count`` templates (both encodings) exist in the cache; returns the template folder."""
    kind = "dx" if sop_class == DX_PRESENTATION else "cr"
    folder = cache / f"templates-{TEMPLATE_VERSION}-{kind}-{ROWS}x{COLS}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count)
               if not (folder / f"{i:05d}-explicit.dcm").is_file() or not (folder / f"{i:05d}-jpegll.dcm").is_file()]
    if not missing:
        return folder
    sources = kaggle_sources(data, count)
    dcmcjpeg = dcmtk_tool("dcmcjpeg")
    jobs = [(i, str(sources[i]), str(folder), sop_class, dcmcjpeg) for i in missing]
    start = time.perf_counter()
    if not quiet:
        print(f"making {len(jobs)} template studies in {folder} (once; cached) ...", flush=True)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for _ in pool.map(_make_template, jobs):
            pass
    if not quiet:
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def restamp(template: Path, out: Path, tag: str, index: int) -> Path:
    """Copy a template with new study/series/instance UIDs and IDs (pixel data untouched)."""
    ds = pydicom.dcmread(template)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.AccessionNumber = f"B{tag}{index:05d}"[:16]
    ds.PatientID = f"P{tag}{index:05d}"[:64]
    ds.StudyID = str(index + 1)
    # a child of 3 at the study date: inside the shipped model's intended use (1-5 years), so every
    # study is scored (templates cached by older versions carry an adult's birth date)
    studied = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d")
    ds.PatientBirthDate = (studied - dt.timedelta(days=3 * 365)).strftime("%Y%m%d")
    ds.save_as(out, enforce_file_format=True)
    return out


def write_studies(out_dir: Path, n: int, syntax: str = "explicit", *, templates: int | None = None,
                  cache: Path = DEFAULT_CACHE, data: Path = DEFAULT_DATA, sop_class: str = DX_PRESENTATION,
                  tag: str | None = None, quiet: bool = False) -> list[Path]:
    """Write ``n`` one-image studies (fresh UIDs) in ``syntax`` to ``out_dir``; returns the files."""
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {', '.join(SYNTAXES)}")
    count = min(n, templates or n)
    folder = ensure_templates(count, cache, data, sop_class, quiet=quiet)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = tag or dt.datetime.now().strftime("%H%M%S")
    files = []
    for i in range(n):
        files.append(restamp(folder / f"{i % count:05d}-{syntax}.dcm", out_dir / f"study{i:05d}.dcm", tag, i))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output folder (explicit/ and jpegll/ inside)")
    ap.add_argument("-n", type=int, default=20, help="studies per encoding")
    ap.add_argument("--syntax", choices=[*SYNTAXES, "both"], default="both")
    ap.add_argument("--templates", type=int, help="distinct pictures (default: n; studies cycle through them)")
    ap.add_argument("--sop-class", choices=("dx", "cr"), default="dx")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    sop = DX_PRESENTATION if args.sop_class == "dx" else CR
    for syntax in (SYNTAXES if args.syntax == "both" else [args.syntax]):
        files = write_studies(args.out / syntax, args.n, syntax, templates=args.templates, cache=args.cache,
                              data=args.data, sop_class=sop)
        size = sum(f.stat().st_size for f in files)
        print(f"{syntax:>8}: {len(files)} studies in {args.out / syntax}, {size / 1e6:.1f} MB "
              f"({size / len(files) / 1e6:.2f} MB a study, transfer syntax {SYNTAXES[syntax]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
