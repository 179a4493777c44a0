"""`send --wrap`: a JPEG/PNG film wrapped as DX, its Patient ID from the Kaggle name (dicom_io.kaggle)."""

from __future__ import annotations

import time
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


def test_wrapped_uids_come_from_the_content_unless_asked_for_new_ones(tmp_path: Path) -> None:
    from worker.cli.wrap import content_seed

    grey = np.full((32, 24), 128, dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), grey)
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())  # same film, other name
    cv2.imwrite(str(tmp_path / "c.png"), grey + 1)

    def uids(name: str, seeded: bool = True) -> tuple[str, str, str]:
        path = tmp_path / name
        ds = wrap_image_as_dicom(path, uid_seed=content_seed(path) if seeded else None)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID

    assert uids("a.png") == uids("a.png") == uids("b.png")
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in uids("a.png"))
    assert not set(uids("a.png")) & set(uids("c.png"))
    assert not set(uids("a.png", seeded=False)) & set(uids("a.png", seeded=False))


def test_wrapping_the_same_file_again_gives_the_same_bytes(tmp_path: Path) -> None:
    """A resent `send --wrap` is a true duplicate (same bytes), not "same UID, different content"."""
    import io
    import os

    from worker.cli.wrap import content_seed

    film = tmp_path / "a.png"
    cv2.imwrite(str(film), np.full((32, 24), 100, dtype=np.uint8))
    os.utime(film, (1_700_000_000, 1_700_000_000))

    def encoded() -> bytes:
        out = io.BytesIO()
        wrap_image_as_dicom(film, uid_seed=content_seed(film)).save_as(out, enforce_file_format=True)
        return out.getvalue()

    first = encoded()
    time.sleep(1.1)  # a clock-based date/time would differ now
    assert encoded() == first
