"""The Kaggle naming rule, in one place (dicom_io/kaggle.py): which patient a film belongs to."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.kaggle import patient_from_name

KAGGLE_NAMES = {
    "person1_bacteria_1.jpeg": "person1",
    "person1_virus_6.jpeg": "person1",
    "person1000_bacteria_2931.jpeg": "person1000",
    "IM-0115-0001.jpeg": "IM-0115",
    "NORMAL2-IM-1234-0001.jpeg": "NORMAL2-IM-1234",
    "normal2-im-0588-0001.jpeg": "normal2-im-0588",  # as written: callers decide about case
    "person123.jpeg": "person123",                  # the patient part may end the name
    "IM-0115.png": "IM-0115",
}
#: Not Kaggle names: the patient part must end at the name's end or its separator.
OTHER_NAMES = ["chest.png", "person12x_a.png", "IM-0115_a.png", "person3-a.png", "scan-IM-1-1.jpeg"]


@pytest.mark.parametrize("name, patient", KAGGLE_NAMES.items())
def test_kaggle_names_carry_the_patient(name: str, patient: str) -> None:
    assert patient_from_name(Path("train/PNEUMONIA") / name) == patient


@pytest.mark.parametrize("name", OTHER_NAMES)
def test_other_names_are_their_own_patient(name: str) -> None:
    assert patient_from_name(name) == Path(name).stem


def test_every_shared_training_file_belongs_to_a_kaggle_patient(kaggle_root: Path) -> None:
    files = [p for p in (kaggle_root / "train").rglob("*.jpeg")]
    assert files and all(patient_from_name(p) != p.stem for p in files)
