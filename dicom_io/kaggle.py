"""The Kaggle chest X-ray layout's file naming: the patient a film belongs to.

``person1000_bacteria_2931.jpeg`` and ``person1000_virus_1681.jpeg`` -> ``person1000``,
``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-0588-0001.jpeg`` -> ``NORMAL2-IM-0588``. The trainer
groups its validation split by it and ``cxr-worker send --wrap`` writes it as the Patient ID, so
both read it here.
"""

from __future__ import annotations

import re
from pathlib import Path

# The patient part ends where the name does or at its separator ("_" after personN, "-" after IM-N).
_PATIENT = re.compile(r"^(person\d+(?=_|$)|(?:NORMAL2-)?IM-\d+(?=-|$))", re.IGNORECASE)


def patient_from_name(path: str | Path) -> str:
    """The patient in a Kaggle file name, as written there; the file's stem for any other name."""
    stem = Path(path).stem
    match = _PATIENT.match(stem)
    return match.group(1) if match else stem
