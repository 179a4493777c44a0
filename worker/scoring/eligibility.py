"""Is a received instance a chest radiograph the model should score? Header-only, never raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

#: The SOP classes the listener accepts and the scorer scores, with their names.
SCORABLE_SOP_CLASSES = {uid: uid.name for uid in (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)}

HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
               "BodyPartExamined", "ViewPosition", "AccessionNumber"]
#: As tags, once: dcmread converts each keyword of specific_tags on every call (~40 us a file).
_HEADER_TAGS = tuple(Tag(keyword) for keyword in HEADER_TAGS)


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
    dataset: Dataset | None = None  # the parsed header: HEADER_TAGS and read_header's `also`


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().rstrip("\x00") or None


def read_header(path: str | Path, also: Sequence[BaseTag] = ()) -> Header:
    """The few attributes the worker needs, without reading pixel data (raises on unreadable files).

    `also`: tags of further attributes to read in the same parse (the receiver passes those the SR
    will need, worker.sr.SOURCE_TAGS); they are in the returned Header's `dataset`.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*_HEADER_TAGS, *also])
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
        dataset=ds,
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
