"""Pixels to model input: DICOM (any common transfer syntax) or JPEG/PNG -> 8-bit grey -> 1x224x224.

No network, no database, no torch. See README "The pixel path".
"""

from __future__ import annotations

from pathlib import Path

from .dicom import read_dicom_display
from .errors import DicomInputError
from .images import is_image_file, read_image_file
from .model_input import INPUT_SIZE, NORM_MEAN, NORM_STD, map_to_image, normalize, resize_for_model, to_model_input
from .resize import fit_within, shrink_within
from .types import DisplayImage


def load_display_image(path: str | Path) -> DisplayImage:
    """Any supported file (DICOM by content, JPEG/PNG by suffix) to an 8-bit display image."""
    if is_image_file(path):
        return DisplayImage(pixels=read_image_file(path), source="image")
    return read_dicom_display(path)


__all__ = [
    "DicomInputError", "DisplayImage", "INPUT_SIZE", "NORM_MEAN", "NORM_STD", "is_image_file",
    "load_display_image", "normalize", "read_dicom_display", "read_image_file", "resize_for_model",
    "map_to_image", "fit_within", "shrink_within",
    "to_model_input",
]
