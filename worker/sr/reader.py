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
    CAD_SUMMARY,
    CERTAINTY_OF_FINDING,
    DEVICE_OBSERVER,
    NONE_SUCCEEDED,
    OOD_SCORE,
    PERCENT,
    PNEUMONIA,
    PRESENT,
    REASON_CODES,
    REASON_NOT_ASSESSED,
    REGION_TRACKING_ID,
    SEGMENT_TRACKING_ID,
    STUDY_TRACKING_ID,
)
from .report import SEGMENTATION_SEGMENT

_REASONS = {(c.scheme_designator, c.value): name for name, c in REASON_CODES.items()}


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
    (device observer UID), model name/version, the referenced source SOP Instance UIDs, and the
    heatmap ``evidence``: per region group (in order) the source image, graphic type, region points
    ((x, y) tuples), the image's probability and presence, and the Segmentation and key image
    references (dicts of UIDs, or None).
    Raises ValueError when the SR holds no pneumonia measurement group.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = sr.content
    every = list(report.get_image_measurement_groups(finding_type=PNEUMONIA))
    groups = [g for g in every if _tracking_id(g) in (STUDY_TRACKING_ID, None)]
    if len(groups) != 1:
        raise ValueError(f"expected one pneumonia measurement group, found {len(groups)}")
    group = groups[0]
    declined = [_declined(g) for g in every if g is not group]
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
        "positive": None if presence is None else presence == "present",
        "probability": probability,
        "model_uid": model_uid,
        "model_name": algorithm_name,
        "model_version": algorithm_version,
        "referenced_sop_instance_uids": referenced,
        "study_instance_uid": str(ds.StudyInstanceUID),
        "sr_instance_uid": str(ds.SOPInstanceUID),
        # "not analysed": assessed is False when the study group says no algorithm succeeded
        "assessed": _summary(group) != _code_tuple(NONE_SUCCEEDED),
        "summary": _summary_meaning(group),
        "not_assessed_reasons": _reasons(group),
        "declined_images": declined,
        "evidence": _evidence(sr, report, {uid for g in every for uid in _source_uids(g)}),
    }


def _group_text(group, identifier: str) -> bool:
    tracking = group.tracking_identifier
    return tracking is not None and str(tracking).startswith(identifier + " ")


def _object(sop_class: str, sop_instance: str, series: dict[str, str], **extra) -> dict[str, Any]:
    return {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance,
            "series_instance_uid": series.get(sop_instance), **extra}


def _library(report) -> list[tuple[str, str, int | None, int | None]]:
    """(SOP class, SOP instance, rows, columns) of each Image Library entry, in order."""
    entries = []
    for library in report[0].get("ContentSequence", []):
        concept = CodedConcept.from_dataset(library.ConceptNameCodeSequence[0])
        if _code_tuple(concept) != _code_tuple(codes.DCM.ImageLibrary):
            continue
        for group in library.get("ContentSequence", []):
            for entry in group.get("ContentSequence", []):
                if entry.get("ValueType") != "IMAGE":
                    continue
                size = {}
                for descriptor in entry.get("ContentSequence", []):
                    concept = _code_tuple(CodedConcept.from_dataset(descriptor.ConceptNameCodeSequence[0]))
                    for name, code in (("rows", codes.DCM.PixelDataRows), ("columns", codes.DCM.PixelDataColumns)):
                        if concept == _code_tuple(code):
                            size[name] = int(float(descriptor.MeasuredValueSequence[0].NumericValue))
                ref = entry.ReferencedSOPSequence[0]
                entries.append((str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID), size.get("rows"),
                                size.get("columns")))
    return entries


def _evidence(sr: hd.sr.Comprehensive3DSR, report, sources: set[str]) -> list[dict[str, Any]]:
    """The heatmap evidence (worker/sr/builder.py): region groups, Segmentation groups (paired by
    their source image) and the key images of the Image Library (paired with the regions in order)."""
    groups = report.get_planar_roi_measurement_groups(finding_type=PNEUMONIA)
    if not groups:
        return []
    series = {}
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for item in study.ReferencedSeriesSequence:
            for sop in item.ReferencedSOPSequence:
                series[str(sop.ReferencedSOPInstanceUID)] = str(item.SeriesInstanceUID)
    segments = {}
    for group in groups:
        if _group_text(group, SEGMENT_TRACKING_ID):
            frame = group.referenced_segmentation_frame
            source = str(frame.source_image_for_segmentation.referenced_sop_instance_uid)
            segments[source] = _object(str(frame.referenced_sop_class_uid), str(frame.referenced_sop_instance_uid),
                                       series, frame_number=int(frame.referenced_frame_numbers[0]),
                                       segment_number=SEGMENTATION_SEGMENT)
    out = []
    for group in groups:
        if not _group_text(group, REGION_TRACKING_ID):
            continue
        region = group.roi
        source = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        measured = group.get_measurements(name=CERTAINTY_OF_FINDING)
        evaluations = group.get_qualitative_evaluations(name=PNEUMONIA)
        presence = None
        if evaluations:
            presence = {_code_tuple(PRESENT): "present", _code_tuple(ABSENT): "absent"}.get(
                _code_tuple(evaluations[0].value))
        out.append({
            "source_sop_instance_uid": source,
            "graphic_type": str(region.graphic_type.value),
            "region": [(float(x), float(y)) for x, y in region.value],
            "probability": float(measured[0].value) / 100.0 if measured else None,
            "presence": presence,
            "segmentation": segments.get(source),
            "key_image": None,
        })
    key_images = [entry for entry in _library(report) if entry[1] not in sources]
    if len(key_images) == len(out):  # a key image for every region or for none (report.py)
        for item, (sop_class, uid, rows, columns) in zip(out, key_images):
            item["key_image"] = _object(sop_class, uid, series, rows=rows, columns=columns)
    return out


def _source_uids(group) -> list[str]:
    return [str(item.referenced_sop_instance_uid) for item in group.source_images]


def _tracking_id(group) -> str | None:
    for item in group[0].get("ContentSequence", []):
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and concept and concept[0].CodeValue == "112039":  # Tracking Identifier
            return str(item.TextValue)
    return None


def _summary(group) -> tuple[str, str] | None:
    found = group.get_qualitative_evaluations(name=CAD_SUMMARY)
    return _code_tuple(found[0].value) if found else None


def _summary_meaning(group) -> str | None:
    found = group.get_qualitative_evaluations(name=CAD_SUMMARY)
    return str(found[0].value.meaning) if found else None


def _reasons(group) -> list[str]:
    return [_REASONS.get(_code_tuple(e.value), str(e.value.value))
            for e in group.get_qualitative_evaluations(name=REASON_NOT_ASSESSED)]


def _declined(group) -> dict[str, Any]:
    scores = group.get_measurements(name=OOD_SCORE)
    images = [str(item.referenced_sop_instance_uid) for item in group.source_images]
    return {"sop_instance_uids": images, "reasons": _reasons(group), "summary": _summary_meaning(group),
            "ood_score": float(scores[0].value) if scores else None}
