"""The quantitative map: a fractional DICOM Segmentation at the source image's own geometry.

Which object, and why (docs/heatmaps.md "Which objects, and why" says the same for users):

* A Parametric Map (PS3.3 A.75) would be the literal object for "a value per pixel", but its IOD makes
  the Frame of Reference module and the Plane Position (Patient) / Plane Orientation (Patient)
  functional groups mandatory. CR images carry no Frame of Reference at all (the CR IOD has no such
  module), and DX/projection images mostly do not either; inventing a Frame of Reference and a plane
  position for a projection radiograph would state a 3-D geometry that does not exist. highdicom's
  ``pm.ParametricMap`` refuses such sources for the same reason.
* A Segmentation (A.51) has the Frame of Reference module as conditional ("required if the source
  has one"): without it the segmentation frames are tied to the source pixel by pixel (same rows and
  columns, Derivation Image references), which is exactly what a class-activation map on a radiograph
  is. FRACTIONAL with Maximum Fractional Value 255 keeps 8 bits of the map (within 1/255 of the
  computed relevance), and SEG is the object AI viewers (OHIF, 3D Slicer, Cornerstone) overlay on the
  source. Fractional Type PROBABILITY is the nearer of the two defined terms (OCCUPANCY would claim
  partial-volume coverage); the segment's description says the values are relative evidence scaled
  to the map's own maximum, not calibrated probabilities.
* The segment: category SCT 49755003 "Morphologically abnormal structure" (CID 7150) and type SCT
  233604007 "Pneumonia", the same code as the SR's finding, so a reader can tie the segment to the
  SR's finding; algorithm type AUTOMATIC with the model's name, version and UID (CID 7162 family
  "Artificial Intelligence").

The object: new series of the source's study (series and instance UIDs from ``heatmap_uids``, a
retry writes the same object), one frame at the source's rows x columns referencing the source
(and, for a multi-frame source, the scored frame), RLE Lossless by default (about 7x fewer bytes
than Explicit VR Little Endian for a smooth map, see benchmarks/bench_heatmap.py; Orthanc stores and
serves it; ``transfer_syntax_uid=ExplicitVRLittleEndian`` for a viewer that reads no RLE).

It is built from the source's HEADER alone (worker.sr.source_dataset: the kept SOURCE_TAGS, no pixel
data), the way the SR is.
"""

from __future__ import annotations

import enum
import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ExplicitVRLittleEndian, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage, RLELossless, SecondaryCaptureImageStorage,
)

from trainer.model_info import ModelInfo
from worker.sr import PNEUMONIA, derived_uid

#: The segment's property (module docstring).
SEGMENT_CATEGORY: Code = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
SEGMENT_TYPE: Code = PNEUMONIA  # SCT 233604007, the SR's finding
SEGMENT_LABEL = "pneumonia evidence (AI heatmap)"
SEGMENT_DESCRIPTION = "HiResCAM relative evidence for pneumonia, scaled to its own maximum; not for diagnosis"
SERIES_DESCRIPTION = "AI heatmap (pneumonia evidence), not for diagnosis"
MAX_FRACTIONAL_VALUE = 255
TRANSFER_SYNTAX = RLELossless
TRANSFER_SYNTAXES = (RLELossless, ExplicitVRLittleEndian)
#: What highdicom's Segmentation reads as attributes of its source (Type 2 there: empty when absent).
_TYPE2_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Legacy multi-frame classes the worker scores (worker/scoring/eligibility.py); see highdicom_source.
MULTI_FRAME_SC = (MultiFrameGrayscaleByteSecondaryCaptureImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
#: The text highdicom copies was decoded by pydicom already: UTF-8 holds any of it.
CHARACTER_SET = "ISO_IR 192"


class HeatmapKind(enum.Enum):
    """The heatmap objects; the value is part of their derived UIDs (keep it stable)."""

    SEGMENTATION = "segmentation"
    KEY_IMAGE = "key-image"


def heatmap_uids(study_uid: str, model_uid: str, revision: int, source_sop_uid: str,
                 kind: HeatmapKind | str) -> tuple[str, str]:
    """Deterministic (series UID, instance UID) of one heatmap object of one source image.

    One series per (study, model, kind), as the SR's series is per (study, model); the instance per
    revision and source image, so a retry rewrites the same object and a re-score makes a new one.
    """
    kind = HeatmapKind(kind)
    for name, value in (("study_uid", study_uid), ("model_uid", model_uid), ("source_sop_uid", source_sop_uid)):
        if not value:
            raise ValueError(f"{name} must not be empty")
    if int(revision) < 0:
        raise ValueError(f"revision must be >= 0, got {revision}")
    series = derived_uid("cxr-worker-heatmap-series", kind.value, study_uid, model_uid)
    instance = derived_uid("cxr-worker-heatmap-instance", kind.value, study_uid, model_uid, str(int(revision)),
                           source_sop_uid)
    return series, instance


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """The model as the SEG's algorithm (name, version, UID as a parameter, CID 7162 AI family)."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version, family=codes.cid7162.ArtificialIntelligence,
        parameters={"model_uid": model.uid, "map": "HiResCAM"},
    )


def highdicom_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source header as highdicom's constructors read it: the Type 2 patient/study attributes they
    read as attributes present (empty when the source lacks them), and a legacy multi-frame source
    (MULTI_FRAME_SC) presented as the single-frame Secondary Capture of its scored frame: highdicom
    maps a SEG without a Frame of Reference onto one source frame only, and reads a multi-frame IOD's
    frames from functional groups these legacy objects lack. The Secondary Capture IOD has the same
    Patient and Study modules; build_segmentation puts the real SOP class and the frame number back
    into the references."""
    header = pydicom.Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "NumberOfFrames"):
            header.add(element)
    if header.get("SOPClassUID") in MULTI_FRAME_SC:
        del header.SOPClassUID  # a new element: the source's own stays as it is
        header.SOPClassUID = SecondaryCaptureImageStorage
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if not header.get(keyword):
            raise ValueError(f"source lacks {keyword}: a heatmap needs the source image's identity and size")
    return header


def _check_map(relevance: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    relevance = np.asarray(relevance, dtype=np.float32)
    shape = (int(source.Rows), int(source.Columns))
    if relevance.shape != shape:
        raise ValueError(f"relevance must be at the source's geometry {shape}, got {relevance.shape} "
                         "(dicom_io.map_to_image)")
    if not np.isfinite(relevance).all() or relevance.min() < 0.0 or relevance.max() > 1.0:
        raise ValueError("relevance must hold finite values in [0, 1] (trainer.cam.relevance)")
    return relevance


def build_segmentation(source: pydicom.Dataset, relevance: np.ndarray, *, model: ModelInfo, series_uid: str,
                       instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                       frame: int | None = None, transfer_syntax_uid: str = TRANSFER_SYNTAX) -> pydicom.Dataset:
    """The fractional SEG of ``relevance`` (float in [0, 1] at the source's rows x columns) on ``source``
    (its header: worker.sr.source_dataset). ``frame``: the scored frame (1-based) of a multi-frame source."""
    if transfer_syntax_uid not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax_uid must be one of {[str(t) for t in TRANSFER_SYNTAXES]}, "
                         f"got {transfer_syntax_uid}")
    if frame is not None and int(frame) < 1:
        raise ValueError(f"frame must be a 1-based frame number, got {frame}")
    header = highdicom_source(source)
    relevance = _check_map(relevance, header)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
    )
    description.SegmentDescription = SEGMENT_DESCRIPTION
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=relevance,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=[description], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=instance_uid, instance_number=instance_number, manufacturer=manufacturer,
        manufacturer_model_name=model.name, software_versions=model.version, device_serial_number=model.uid,
        max_fractional_value=MAX_FRACTIONAL_VALUE, transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=False, series_description=SERIES_DESCRIPTION, specific_character_set=CHARACTER_SET,
    )
    # General Image: Patient Orientation is Type 2C, required where the frames have no Plane Orientation
    # (a projection radiograph, with or without a Frame of Reference): the SEG's frames are the source's
    # pixels, so its orientation is the source's (empty when the source has none); highdicom sets none.
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        seg.PatientOrientation = source.get("PatientOrientation") or None
    # highdicom draws a random Dimension Organization UID; derived from the instance, a retry writes the
    # same object
    organisation = derived_uid("cxr-worker-heatmap-dimensions", instance_uid)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    sop_class = source.SOPClassUID
    for item in seg.get("SourceImageSequence", []):
        item.ReferencedSOPClassUID = sop_class
        if frame is not None:
            item.ReferencedFrameNumber = int(frame)
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.get("DerivationImageSequence", []):
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPClassUID = sop_class
                if frame is not None:
                    item.ReferencedFrameNumber = int(frame)
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPClassUID = sop_class
    return seg


def encode(ds: pydicom.Dataset) -> bytes:
    """A heatmap object as DICOM Part 10 bytes (its transfer syntax as built)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
