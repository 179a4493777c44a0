"""What the pixel path hands to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DisplayImage:
    """An 8-bit grey image ready for dicom_io.to_model_input, with where it came from."""

    pixels: np.ndarray                 # 2-D uint8, any size
    source: str                        # "dicom" | "image"
    transfer_syntax: str | None = None  # DICOM Transfer Syntax UID, if DICOM
    frame: int | None = None           # 0-based frame used, if the object has frames
    number_of_frames: int = 1
    notes: list[str] = field(default_factory=list)  # e.g. "multi-frame: first of 3 frames used"
    decoder: str | None = None         # DICOM: pydicom decoding plugin used ("native" if uncompressed)
    voi: str | None = None             # DICOM: VOI applied, e.g. "window 15000/30000 LINEAR", "auto 12..3900"
