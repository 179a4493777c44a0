"""`send --wrap`: a JPEG/PNG film wrapped as DX, its Patient ID from the Kaggle name (dicom_io.kaggle)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import DigitalXRayImageStorageForPresentation

from worker.cli.wrap import wrap_image_as_dicom


def test_wrapped_film_takes_the_kaggle_patient_as_patient_id(tmp_path: Path) -> None:
    grey = np.full((32, 24), 128, dtype=np.uint8)
    cases = {"person1000_bacteria_2931.png": "person1000", "IM-0115-0001.png": "IM-0115",
             "NORMAL2-IM-1234-0001.png": "NORMAL2-IM-1234", "chest.png": "chest", "x" * 80 + ".png": "x" * 64}
    for name, patient in cases.items():
        path = tmp_path / name
        cv2.imwrite(str(path), grey)
        ds = wrap_image_as_dicom(path, patient_name="DEMO")
        assert ds.PatientID == patient                  # at most 64 characters (LO)
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == DigitalXRayImageStorageForPresentation
    assert wrap_image_as_dicom(tmp_path / "chest.png", patient_id="GIVEN").PatientID == "GIVEN"
