"""Is a received instance a chest radiograph the model should score? Header-only, never raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SC_MF_GRAY_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
SC_MF_GRAY_WORD = "1.2.840.10008.5.1.4.1.1.7.3"

SCORABLE_SOP_CLASSES = {
    CR: "Computed Radiography Image Storage",
    DX_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    DX_PROCESSING: "Digital X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
    SC_MF_GRAY_BYTE: "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    SC_MF_GRAY_WORD: "Multi-frame Grayscale Word Secondary Capture Image Storage",
}

HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
               "BodyPartExamined", "ViewPosition", "AccessionNumber"]


@dataclass
class Header:
    study_uid: str
    series_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    accession: str | None
    transfer_syntax: str | None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().rstrip("\x00") or None


def read_header(path: str | Path) -> Header:
    """The few attributes the worker needs, without reading pixel data (raises on unreadable files)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    meta = getattr(ds, "file_meta", None)
    sop_instance = _text(ds, "SOPInstanceUID") or (str(meta.MediaStorageSOPInstanceUID) if meta else "")
    sop_class = _text(ds, "SOPClassUID") or (str(meta.MediaStorageSOPClassUID) if meta else "")
    return Header(
        study_uid=_text(ds, "StudyInstanceUID") or "",
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        accession=_text(ds, "AccessionNumber"),
        transfer_syntax=str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None,
    )


def check(header: Header, allowed_body_parts: list[str], excluded_views: list[str]) -> tuple[bool, str | None, str | None]:
    """(eligible, reason, detail). Reasons are short codes stored in the database."""
    if header.sop_class_uid not in SCORABLE_SOP_CLASSES:
        return False, "wrong_sop_class", f"SOP Class {header.sop_class_uid} is not a radiograph class"
    if header.body_part and allowed_body_parts and header.body_part.upper() not in allowed_body_parts:
        return False, "not_chest", f"BodyPartExamined is {header.body_part!r}"
    if header.view_position and header.view_position.upper() in excluded_views:
        return False, "lateral_view", f"ViewPosition is {header.view_position!r}"
    return True, None, None
