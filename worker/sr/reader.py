"""Reading the pneumonia SR back: what build_pneumonia_sr wrote, as a plain dict.

Kept apart from the writer (worker/sr/builder.py) because the worker itself only writes SRs; reading them
back is for tests, tools and checks on what a PACS holds. It goes through highdicom's TID 1500
parser, so it also reads SRs written by other TID 1500 producers that use the same codes.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .builder import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    DEVICE_OBSERVER,
    PERCENT,
    PNEUMONIA,
    PRESENT,
)


def _code_tuple(concept: Any) -> tuple[str, str]:
    """(scheme, value) of a Code or CodedConcept, to compare codes whatever their meaning text."""
    return (str(concept.scheme_designator), str(concept.value))


def _text_value(container: pydicom.Dataset, name: Code) -> str | None:
    """The TEXT value of a direct child content item with concept `name` (TID 4019 rows)."""
    for item in container.get("ContentSequence", []):
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and concept and _code_tuple(CodedConcept.from_dataset(concept[0])) == _code_tuple(name):
            return str(item.TextValue)
    return None


def read_pneumonia_sr(ds: pydicom.Dataset) -> dict[str, Any]:
    """Read back what build_pneumonia_sr wrote, through highdicom's TID 1500 parser.

    Returns finding, presence ("present"/"absent"), probability in [0, 1], positive, model UID
    (device observer UID), model name/version, and the referenced source SOP Instance UIDs.
    Raises ValueError when the SR holds no pneumonia measurement group.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = sr.content
    groups = [g for g in report.get_image_measurement_groups(finding_type=PNEUMONIA)]
    if len(groups) != 1:
        raise ValueError(f"expected one pneumonia measurement group, found {len(groups)}")
    group = groups[0]
    evaluations = group.get_qualitative_evaluations(name=PNEUMONIA)
    presence = None
    if evaluations:
        value = _code_tuple(evaluations[0].value)
        presence = {_code_tuple(PRESENT): "present", _code_tuple(ABSENT): "absent"}.get(value)
    measurements = group.get_measurements(name=CERTAINTY_OF_FINDING)
    probability = None
    if measurements:
        unit = _code_tuple(measurements[0].unit)
        scale = 100.0 if unit == _code_tuple(PERCENT) else 1.0
        probability = float(measurements[0].value) / scale
    device = report.get_observer_contexts(observer_type=DEVICE_OBSERVER)
    model_uid = None
    if device:
        model_uid = str(device[0].observer_identifying_attributes.uid)
    algorithm_name = _text_value(group[0], codes.DCM.AlgorithmName)
    algorithm_version = _text_value(group[0], codes.DCM.AlgorithmVersion)
    referenced: list[str] = []
    for item in group.source_images:
        uid = str(item.referenced_sop_instance_uid)
        if uid not in referenced:
            referenced.append(uid)
    return {
        "finding": PNEUMONIA.meaning if group.finding_type == PNEUMONIA else str(group.finding_type.meaning),
        "presence": presence,
        "positive": presence == "present",
        "probability": probability,
        "model_uid": model_uid,
        "model_name": algorithm_name,
        "model_version": algorithm_version,
        "referenced_sop_instance_uids": referenced,
        "study_instance_uid": str(ds.StudyInstanceUID),
        "sr_instance_uid": str(ds.SOPInstanceUID),
    }
