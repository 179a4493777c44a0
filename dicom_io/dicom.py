"""DICOM pixel data to an 8-bit display image (PROVISIONAL basic version; to be replaced).

Interface contract used by worker and tests:
    read_dicom_display(path_or_dataset) -> DisplayImage
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .errors import DicomInputError
from .types import DisplayImage


def read_dicom_display(source: str | Path | Dataset) -> DisplayImage:
    """Decode, modality LUT, VOI, MONOCHROME1 inversion -> uint8 display image."""
    try:
        ds = source if isinstance(source, Dataset) else pydicom.dcmread(source)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same answer for the caller
        raise DicomInputError("not_dicom", f"cannot parse DICOM: {exc}") from exc
    if "PixelData" not in ds:
        raise DicomInputError("no_pixel_data", "dataset has no Pixel Data")
    arr = ds.pixel_array
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    out = np.round((arr - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255 - out
    return DisplayImage(pixels=out, source="dicom", transfer_syntax=str(ds.file_meta.TransferSyntaxUID) if "file_meta" in ds else None)
