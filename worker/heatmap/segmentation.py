"""The quantitative map: a fractional DICOM Segmentation at the source image's own geometry.

Which object, and why (docs/heatmaps.md "Which objects, and why" says the same for users):

* A Parametric Map (PS3.3 A.75) would be the literal object for "a value per pixel", but its IOD makes
  the Frame of Reference module and the Plane Position (Patient) / Plane Orientation (Patient)
  functional groups mandatory. CR images carry no Frame of Reference at all (the CR IOD has no such
  module), and DX/projection images mostly do not either; inventing a Frame of Reference and a plane
  position for a projection radiograph would state a 3-D geometry that does not exist (highdicom
  0.28.2's ``pm.ParametricMap`` raises a RuntimeError on a CR source without a Frame of Reference).
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
(and, for a multi-frame source, the scored frame). Transfer syntax: Explicit VR Little Endian by
default, ``transfer_syntax_uid=RLELossless`` on request (the worker's default, settings
``heatmap.segmentation_compression``). At 2500 x 2048 (benchmarks/bench_heatmap.py) RLE makes 2.1-2.4 MB
of a CAM map instead of 5.1 MB (0.7 MB for a single smooth blob); its encoding is most of the fast
path's cost, and a destination must accept RLE Lossless for SEG Storage (Orthanc does; the SCU
proposes the file's syntax and has no fallback to transcode): every PACS accepts Explicit VR Little
Endian. The fast path encodes RLE with imagecodecs' PackBits (``rle_lossless_frame``: half of GDCM's
time, which highdicom uses); the bytes differ from GDCM's, the decoded pixels are the same. The
heatmap adds to every positive study's CPU, which the ingest benchmark holds to >= 0.8x of heatmaps off.

The map comes as float relevance in [0, 1] (quantised here as highdicom quantises it) or as the
quantised levels themselves (uint8 0..MAX_FRACTIONAL_VALUE at the source's geometry: ``map_levels``,
the worker's path: the 7 x 7 cells interpolated as levels, within one level of the float map, at a
fifth of the float map's cost).

It is built from the source's HEADER alone (worker.sr.source_dataset: the kept SOURCE_TAGS, no pixel
data), the way the SR is.
"""

from __future__ import annotations

import copy
import datetime
import enum
import functools
import io
import logging

import struct
from dataclasses import dataclass

import cv2
import highdicom as hd
import imagecodecs
import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM
from pydicom.uid import (
    ExplicitVRLittleEndian, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage, RLELossless, SecondaryCaptureImageStorage,
)

from trainer.model_info import ModelInfo
from worker.sr import PNEUMONIA, derived_uid
from worker.sr import acquisition_equipment as sr_acquisition_equipment
from worker.sr.builder import evidence_copy
from worker.sr.byte_template import Template
from worker.sr.sources import PATIENT_STUDY_TAGS

log = logging.getLogger("cxr_worker.heatmap")

#: The segment's property (module docstring).
SEGMENT_CATEGORY: Code = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
SEGMENT_TYPE: Code = PNEUMONIA  # SCT 233604007, the SR's finding
SEGMENT_LABEL = "pneumonia evidence (AI heatmap)"
SEGMENT_DESCRIPTION = "HiResCAM relative evidence for pneumonia, scaled to its own maximum; not for diagnosis"
SERIES_DESCRIPTION = "AI heatmap (pneumonia evidence), not for diagnosis"
MAX_FRACTIONAL_VALUE = 255
TRANSFER_SYNTAX = ExplicitVRLittleEndian  # module docstring: why not RLE by default
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, RLELossless)
#: What highdicom's Segmentation reads as attributes of its source (Type 2 there: empty when absent).
_TYPE2_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Legacy multi-frame classes the worker scores (worker/scoring/eligibility.py); see highdicom_source.
MULTI_FRAME_SC = (MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
                  MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
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
    """The source header as highdicom's constructors read it: the source values the SR copies made valid
    or left empty exactly as for the SR (worker.sr.builder.evidence_copy: too long, undecodable, badly
    formatted values, a Patient Sex outside M/F/O), the Type 2 patient/study attributes they read as
    attributes present (empty when the source lacks them), and a legacy multi-frame source
    (MULTI_FRAME_SC) presented as the single-frame Secondary Capture of its scored frame: highdicom
    maps a SEG without a Frame of Reference onto one source frame only, and reads a multi-frame IOD's
    frames from functional groups these legacy objects lack. The Secondary Capture IOD has the same
    Patient and Study modules; build_segmentation puts the real SOP class and the frame number back
    into the references."""
    fixed = evidence_copy(source)  # the SR's rule: invalid values made valid or left empty (worker/sr/values.py)
    header = pydicom.Dataset()
    for element in fixed:
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


def map_levels(relevance: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The SEG's levels (uint8 0..MAX_FRACTIONAL_VALUE) of a map over the model input (float in [0, 1],
    e.g. ResNet18's 7 x 7 cells) at the source's rows x columns: the cells quantised as highdicom
    quantises, then interpolated as dicom_io.map_to_image interpolates (bilinear between cell
    centres, each axis on its own), in OpenCV's 8-bit fixed point. Within one level of quantising
    map_to_image's float map (tested), at a fifth of its cost at 2500 x 2048: no 20 MB float map."""
    relevance = np.asarray(relevance, dtype=np.float32)
    if relevance.ndim != 2 or relevance.size == 0 or rows < 1 or cols < 1:
        raise ValueError(f"expected a 2-D map and a positive size, got {relevance.shape} -> {rows}x{cols}")
    if not np.isfinite(relevance).all() or relevance.min() < 0.0 or relevance.max() > 1.0:
        raise ValueError("relevance must hold finite values in [0, 1] (trainer.cam.relevance)")
    return cv2.resize(_quantise(relevance), (int(cols), int(rows)), interpolation=cv2.INTER_LINEAR)


def _check_map(relevance: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """The map as the SEG's levels: uint8 levels as they are, float relevance quantised (checked)."""
    relevance = np.asarray(relevance)
    shape = (int(source.Rows), int(source.Columns))
    if relevance.shape != shape:
        raise ValueError(f"relevance must be at the source's geometry {shape}, got {relevance.shape} "
                         "(dicom_io.map_to_image, map_levels)")
    if relevance.dtype == np.uint8:  # every uint8 is a level: MAX_FRACTIONAL_VALUE is 255
        return relevance
    relevance = relevance.astype(np.float32, copy=False)
    if not np.isfinite(relevance).all() or relevance.min() < 0.0 or relevance.max() > 1.0:
        raise ValueError("relevance must hold finite values in [0, 1] (trainer.cam.relevance), or be uint8 levels")
    return _quantise(relevance)


def _check_options(frame: int | None, transfer_syntax_uid: str) -> None:
    if transfer_syntax_uid not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax_uid must be one of {[str(t) for t in TRANSFER_SYNTAXES]}, "
                         f"got {transfer_syntax_uid}")
    if frame is not None and int(frame) < 1:
        raise ValueError(f"frame must be a 1-based frame number, got {frame}")


def build_segmentation_reference(source: pydicom.Dataset, relevance: np.ndarray, *, model: ModelInfo,
                                 series_uid: str, instance_uid: str, series_number: int, instance_number: int,
                                 manufacturer: str, frame: int | None = None,
                                 transfer_syntax_uid: str = TRANSFER_SYNTAX) -> pydicom.Dataset:
    """The SEG as highdicom builds it (the reference; build_segmentation gives the same object faster)."""
    _check_options(frame, transfer_syntax_uid)
    header = highdicom_source(source)
    levels = _check_map(relevance, header)
    return _build_reference(source, header, levels, model=model, series_uid=series_uid,
                            instance_uid=instance_uid, series_number=series_number, instance_number=instance_number,
                            manufacturer=manufacturer, frame=frame, transfer_syntax_uid=transfer_syntax_uid)


def _build_reference(source: pydicom.Dataset, header: pydicom.Dataset, levels: np.ndarray, *, model: ModelInfo,
                     series_uid: str, instance_uid: str, series_number: int, instance_number: int,
                     manufacturer: str, frame: int | None, transfer_syntax_uid: str) -> pydicom.Dataset:
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
    )
    description.SegmentDescription = SEGMENT_DESCRIPTION
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=levels.astype(np.float32) / np.float32(MAX_FRACTIONAL_VALUE),
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


# --- The fast path: later SEGs of the same shape from the first one's data set ------------------------
#: Templates kept (one per source shape, model and options; a site has a few detector shapes).
TEMPLATE_CACHE_SIZE = 32
_templates: dict[tuple, "_Kept"] = {}
_template_counts = {"reference": 0, "template": 0}


def clear_segmentation_templates() -> None:
    _templates.clear()
    _template_counts.update(reference=0, template=0)


def segmentation_template_info() -> dict[str, int]:
    """Since the last clear: how many templates highdicom built ("reference") and how many SEGs were made
    from one ("template"): every SEG is; tests and benchmarks check how often a template was built. Of
    the templates kept ("templates"), how many have a byte template (encode_segmentation's path)."""
    return {**_template_counts, "templates": len(_templates),
            "byte_templates": sum(kept.bytes is not None for kept in _templates.values())}


def _template_key(header: pydicom.Dataset, model: ModelInfo, manufacturer: str, frame: int | None,
                  transfer_syntax_uid: str) -> tuple:
    """Everything that decides the SEG's structure: the source's SOP class, size and which attributes it
    has, the model, the manufacturer, the frame and the transfer syntax. Values that vary per study
    (patient, study, UIDs, orientation, equipment) are set again from the source by _from_template."""
    return (str(header.SOPClassUID), int(header.Rows), int(header.Columns), frozenset(header.keys()), model.uid,
            model.name, model.version, manufacturer, frame, str(transfer_syntax_uid))


def _quantise(relevance: np.ndarray) -> np.ndarray:
    """highdicom's FRACTIONAL mapping, np.around(value * 255) as uint8 (float32 product, round half to
    even), in one OpenCV pass (6x cheaper at 5 M pixels; the same values, ties included: tested)."""
    return cv2.convertScaleAbs(relevance, alpha=float(MAX_FRACTIONAL_VALUE))


def rle_lossless_frame(frame: np.ndarray) -> bytes:
    """One 8-bit single-sample frame as a DICOM RLE Lossless frame (PS3.5 Annex G): the RLE header
    (16 little-endian uint32: one segment, its offset 64) and the segment, PackBits of each row on
    its own (imagecodecs encodes a 2-D array row by row: no run crosses a row boundary, tested),
    padded with a zero byte to even length."""
    frame = np.asarray(frame)
    if frame.ndim != 2 or frame.dtype != np.uint8 or frame.size == 0:
        raise ValueError(f"frame must be a 2-D uint8 array, got {frame.dtype} {frame.shape}")
    segment = imagecodecs.packbits_encode(np.ascontiguousarray(frame))
    return struct.pack("<16I", 1, 64, *([0] * 14)) + segment + (b"\x00" if len(segment) % 2 else b"")


def _pixel_data(seg: pydicom.Dataset, levels: np.ndarray) -> bytes:
    """The Pixel Data of one FRACTIONAL frame as highdicom writes it: native 8-bit bytes (padded to even
    length as highdicom pads), or the RLE Lossless frame encapsulated with a Basic Offset Table."""
    if UID(seg.file_meta.TransferSyntaxUID).is_encapsulated:
        return encapsulate([rle_lossless_frame(levels)])
    data = levels.tobytes()
    return data + b"0" if len(data) % 2 else data


def _source_elements(template: pydicom.Dataset, header: pydicom.Dataset) -> tuple:
    """The tags of ``template`` that highdicom took from the source: its copy of the Patient and Study
    modules (the tags of PATIENT_STUDY_TAGS the source has and the template holds)."""
    return tuple(tag for tag in header.keys() if tag in PATIENT_STUDY_TAGS and tag in template)


#: The template's elements _from_template sets for each object (copied there, never shared).
_PER_OBJECT = frozenset(pydicom.tag.Tag(keyword) for keyword in (
    "SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber", "InstanceNumber", "InstanceCreationDate",
    "InstanceCreationTime", "ContentDate", "ContentTime", "ContributingEquipmentSequence", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "PatientOrientation", "DimensionOrganizationSequence", "DimensionIndexSequence",
    "SourceImageSequence", "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence", "Rows", "Columns",
    "PixelData"))
#: The size of the stand-in source highdicom builds a template for (_template): its checks of the map
#: (a sort of every value) and its module tables then cost ~30 ms instead of ~250 ms at 2500 x 2048.
_STAND_IN_SIZE = 2


_EQUIPMENT = pydicom.tag.Tag("ContributingEquipmentSequence")
_PIXEL_DATA = pydicom.tag.Tag("PixelData")


@functools.cache
def _is_image_class(sop_class_uid: str) -> bool:
    """Whether highdicom's for_image_acquisition takes a source of this SOP class as an image (it checks
    the class against the standard's tables, ~2 ms a call): asked once per class."""
    probe = pydicom.Dataset()
    probe.SOPClassUID, probe.Manufacturer = sop_class_uid, "probe"
    try:
        hd.ContributingEquipment.for_image_acquisition(probe)
    except ValueError:
        return False
    return True


def acquisition_equipment(header: pydicom.Dataset) -> hd.ContributingEquipment | None:
    """highdicom's ContributingEquipment.for_image_acquisition(header), or None where it raises (not an
    image, no Manufacturer): the SR's copy of it (worker.sr.acquisition_equipment) with the SOP class
    check asked once per class (_is_image_class). tests/worker/heatmap compares it with highdicom's."""
    if not _is_image_class(str(header.SOPClassUID)):
        return None
    return sr_acquisition_equipment(header)


def _equipment(header: pydicom.Dataset) -> list:
    """The SEG's Contributing Equipment items, as highdicom's _add_contributing_equipment makes them:
    the source's acquisition equipment (where highdicom finds one), then highdicom's own."""
    acquisition = acquisition_equipment(header)
    return [*([acquisition] if acquisition is not None else []), hd.ContributingEquipment.for_highdicom()]


def _mark_equipment(ds: pydicom.Dataset, marks: dict[int, tuple]) -> bool:
    """A byte template's slots in the Contributing Equipment Sequence (_equipment's items): the source's
    acquisition item, where there is one (True), as a whole item, and the clock of highdicom's own item
    (the rest of that item is the same in every object)."""
    items = list(ds.ContributingEquipmentSequence)
    if "ContributionDateTime" in items[-1]:
        marks[id(items[-1]["ContributionDateTime"])] = ("contribution",)
    if len(items) > 1:
        marks[id(items[0])] = ("acquisition",)
    return len(items) > 1


def _equipment_values(acquisition: hd.ContributingEquipment | None, contribution) -> dict[tuple, object]:
    """The values of _mark_equipment's slots: the source's acquisition item (acquisition_equipment)
    and highdicom's clock."""
    return {("acquisition",): acquisition, ("contribution",): contribution}


def _from_template(template: pydicom.Dataset, copied: tuple, source: pydicom.Dataset, header: pydicom.Dataset,
                   levels: np.ndarray, *, series_uid: str, instance_uid: str, series_number: int,
                   instance_number: int, now: datetime.datetime | None = None,
                   equipment: list | None = None) -> pydicom.Dataset:
    """A copy of ``template`` with every per-study value set as _build_reference sets it.

    Only the elements set below are copied (_PER_OBJECT, deep: setting a value changes the element in
    place); the others are the template's own element objects, shared and never changed (a deep copy
    of the whole data set was a third of the SEG's cost). ``now``: the creation date and time (the
    clock's, unless given); ``equipment``: the Contributing Equipment Sequence's items (made here
    unless given: highdicom's own item carries the clock too)."""
    seg = pydicom.Dataset()
    for tag in template.keys():
        if tag == _EQUIPMENT:  # made anew below
            continue
        element = template[tag]
        seg.add(copy.deepcopy(element) if tag in _PER_OBJECT else element)
    seg.file_meta = copy.deepcopy(template.file_meta)
    seg.set_original_encoding(False, True)
    for tag in copied:
        seg[tag] = copy.deepcopy(header[tag])
    seg.SeriesInstanceUID, seg.SOPInstanceUID = series_uid, instance_uid
    seg.file_meta.MediaStorageSOPInstanceUID = instance_uid
    seg.SeriesNumber, seg.InstanceNumber = series_number, instance_number
    seg.Rows, seg.Columns = int(header.Rows), int(header.Columns)
    now = now or datetime.datetime.now()
    seg.InstanceCreationDate, seg.InstanceCreationTime = DA(now.date()), TM(now.time())
    if "ContentDate" in seg:
        seg.ContentDate, seg.ContentTime = now.date(), now.time()
    seg.ContributingEquipmentSequence = equipment if equipment is not None else _equipment(header)
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
        if keyword in seg:
            setattr(seg, keyword, header.get(keyword))
    if "PatientOrientation" in seg:
        seg.PatientOrientation = source.get("PatientOrientation") or None
    organisation = derived_uid("cxr-worker-heatmap-dimensions", instance_uid)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    sop, series = source.SOPInstanceUID, header.SeriesInstanceUID
    for item in seg.get("SourceImageSequence", []):
        item.ReferencedSOPInstanceUID = sop
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.get("DerivationImageSequence", []):
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPInstanceUID = sop
    for reference in seg.ReferencedSeriesSequence:
        reference.SeriesInstanceUID = series
        for item in reference.ReferencedInstanceSequence:
            item.ReferencedSOPInstanceUID = sop
    seg.PixelData = _pixel_data(seg, levels)
    return seg


def build_segmentation(source: pydicom.Dataset, relevance: np.ndarray, *, model: ModelInfo, series_uid: str,
                       instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                       frame: int | None = None, transfer_syntax_uid: str = TRANSFER_SYNTAX) -> pydicom.Dataset:
    """The fractional SEG of ``relevance`` (float in [0, 1], or uint8 levels (map_levels), at the source's
    rows x columns) on ``source`` (its header: worker.sr.source_dataset). ``frame``: the scored frame
    (1-based) of a multi-frame source.

    Built from a template: the data set highdicom builds (build_segmentation_reference) for the same
    source at a stand-in size of 2 x 2 (every structure it writes, none of the cost of checking 5 M
    values), kept per _template_key; each SEG is that data set with the size, the per-study values
    and the pixels set again: about 20x cheaper than highdicom at 2500 x 2048
    (benchmarks/bench_heatmap.py), the first of a shape included. The same object either way
    (tests/worker/heatmap/test_heatmap_objects.py compares the bytes with highdicom's at full size).
    """
    header, levels, kept = _shape(source, relevance, None, model=model, manufacturer=manufacturer, frame=frame,
                                  transfer_syntax_uid=transfer_syntax_uid)
    return _from_template(kept.dataset, kept.copied, source, header, levels, series_uid=series_uid,
                          instance_uid=instance_uid, series_number=series_number, instance_number=instance_number)


def encode_segmentation(source: pydicom.Dataset, relevance: np.ndarray, *, model: ModelInfo, series_uid: str,
                        instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                        frame: int | None = None, transfer_syntax_uid: str = TRANSFER_SYNTAX,
                        header: pydicom.Dataset | None = None) -> bytes:
    """``encode(build_segmentation(...))``: the SEG's Part 10 bytes (the same bytes up to the clock
    values, tested), from the shape's byte template (worker/sr/byte_template.py, as for the SR). The
    template's constant runs were encoded once, when it was made; each SEG encodes only the ~20 values
    that are its own (_slot_values: UIDs, numbers, clock, size, the copied patient/study elements, the
    equipment, the pixels) and splices them in: no copy of the template's data set, no pydicom writer
    over its ~130 elements (~7 ms of a SEG's ~20 besides the RLE). ``header``: highdicom_source(source),
    where the caller has it already."""
    header, levels, kept = _shape(source, relevance, header, model=model, manufacturer=manufacturer, frame=frame,
                                  transfer_syntax_uid=transfer_syntax_uid)
    ids = dict(series_uid=series_uid, instance_uid=instance_uid, series_number=series_number,
               instance_number=instance_number)
    acquisition = acquisition_equipment(header)
    if kept.bytes is None or (acquisition is not None) != kept.acquisition:
        # the byte template did not give pydicom's bytes back, or this source names no acquisition
        # equipment where the template's did (or the reverse): pydicom writes it all
        return encode(_from_template(kept.dataset, kept.copied, source, header, levels, **ids))
    now = datetime.datetime.now()
    values = _slot_values(kept, source, header, levels, now=now, acquisition=acquisition, contribution=DT(now),
                          **ids)
    return kept.bytes.render(values.__getitem__)


def _shape(source: pydicom.Dataset, relevance: np.ndarray, header: pydicom.Dataset | None, *, model: ModelInfo,
           manufacturer: str, frame: int | None, transfer_syntax_uid: str) -> tuple:
    """What build_segmentation and encode_segmentation start from: the checked options, the source as
    highdicom reads it (``header`` where given), the map's levels, and the shape's template (counted)."""
    _check_options(frame, transfer_syntax_uid)
    header = highdicom_source(source) if header is None else header
    levels = _check_map(relevance, header)
    key = _template_key(header, model, manufacturer, frame, transfer_syntax_uid)
    kept = _kept(source, header, key, model=model, manufacturer=manufacturer, frame=frame,
                 transfer_syntax_uid=transfer_syntax_uid)
    _template_counts["template"] += 1
    return header, levels, kept


@dataclass(frozen=True)
class _Kept:
    """One shape's template: highdicom's data set at the stand-in size without its pixels, the source
    elements it copied (_source_elements), and its byte template with the encapsulation of its pixels
    (None where the template does not give pydicom's bytes back: then pydicom encodes each SEG whole)."""

    dataset: pydicom.Dataset
    copied: tuple
    bytes: Template | None = None
    encapsulated: bool = False
    acquisition: bool = False  # its equipment names the source's acquisition equipment (_mark_equipment)


def _kept(source: pydicom.Dataset, header: pydicom.Dataset, key: tuple, **options) -> _Kept:
    kept = _templates.get(key)
    if kept is None:
        if len(_templates) >= TEMPLATE_CACHE_SIZE:
            _templates.clear()
        kept = _Kept(*_template(source, header, **options))
        kept = _templates[key] = _with_bytes(kept, source, header)
    return kept


#: The top-level elements that are byte-template slots: those _from_template sets, and the pixels.
_TOP_SLOTS = _PER_OBJECT - {pydicom.tag.Tag(k) for k in (
    "DimensionOrganizationSequence", "DimensionIndexSequence", "SourceImageSequence",
    "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence", "ContributingEquipmentSequence")}
#: The nested elements _from_template sets (in those five sequences), by what their value is.
_NESTED_SLOTS = {"ReferencedSOPInstanceUID": ("source_sop",), "DimensionOrganizationUID": ("organisation",)}


def _mark_nested(ds: pydicom.Dataset, marks: dict[int, tuple], in_series: bool = False) -> None:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _mark_nested(item, marks, in_series or element.keyword == "ReferencedSeriesSequence")
        elif element.keyword in _NESTED_SLOTS:
            marks[id(element)] = _NESTED_SLOTS[element.keyword]
        elif in_series and element.keyword == "SeriesInstanceUID":
            marks[id(element)] = ("source_series",)


def _with_bytes(kept: _Kept, source: pydicom.Dataset, header: pydicom.Dataset) -> _Kept:
    """``kept`` with its byte template: the data set (a placeholder for the pixels) cut into constant
    runs and slots (the top-level elements of _TOP_SLOTS and the copied source elements by tag, the
    references to the source and the dimension organisation inside the sequences, the file meta's
    instance UID). Kept only when a SEG made from it is byte for byte the one pydicom writes for
    _from_template's data set (a probe with other UIDs, size and clock), and none of the source's or
    the stand-in's UIDs is left in its constant runs."""
    template = pydicom.Dataset()
    for element in kept.dataset:
        template.add(element)
    template.file_meta = kept.dataset.file_meta
    template.PixelData = b""
    marks: dict[int, tuple] = {}
    for element in template:
        if element.tag in _TOP_SLOTS or element.tag in kept.copied or element.tag == _PIXEL_DATA:
            marks[id(element)] = ("element", element.tag)
        elif element.VR == "SQ":
            for item in element.value:
                _mark_nested(item, marks, element.keyword == "ReferencedSeriesSequence")
    marks[id(template.file_meta["MediaStorageSOPInstanceUID"])] = ("instance",)
    acquisition = _mark_equipment(template, marks)
    parts = Template.cut(template, marks)
    candidate = _Kept(kept.dataset, kept.copied, parts, UID(template.file_meta.TransferSyntaxUID).is_encapsulated,
                      acquisition)
    probe = dict(series_uid="2.25.1", instance_uid="2.25.2", series_number=7, instance_number=3,
                 now=datetime.datetime(2001, 2, 3, 4, 5, 6, 789))
    equipment = _equipment(header)
    levels = np.arange(int(header.Rows) * int(header.Columns), dtype=np.uint32).astype(np.uint8)
    levels = levels.reshape(int(header.Rows), int(header.Columns))
    expected = encode(_from_template(kept.dataset, kept.copied, source, header, levels, equipment=equipment, **probe))
    contribution = equipment[-1].get("ContributionDateTime")
    if parts.render(_slot_values(candidate, source, header, levels, acquisition=acquisition_equipment(header),
                                 contribution=contribution, **probe).__getitem__) != expected:
        log.warning("SEG byte template for %s does not give pydicom's bytes back; pydicom encodes these SEGs",
                    header.SOPClassUID)
        return kept
    uids = [str(header.get(k)) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                                          "FrameOfReferenceUID") if header.get(k)]
    uids += [str(kept.dataset.SOPInstanceUID), str(kept.dataset.SeriesInstanceUID)]
    if parts.leaks(uids):
        log.warning("SEG byte template for %s leaves a per-object UID in its constant bytes; pydicom encodes "
                    "these SEGs", header.SOPClassUID)
        return kept
    return candidate


def _slot_values(kept: _Kept, source: pydicom.Dataset, header: pydicom.Dataset, levels: np.ndarray, *,
                 series_uid: str, instance_uid: str, series_number: int, instance_number: int,
                 now: datetime.datetime, acquisition: hd.ContributingEquipment | None,
                 contribution) -> dict[tuple, object]:
    """The byte template's slot values of one SEG: what _from_template sets, element by element
    (``acquisition``: acquisition_equipment(header); ``contribution``: highdicom's equipment item's clock)."""
    values: dict[tuple, object] = {
        **_equipment_values(acquisition, contribution),
        ("instance",): instance_uid, ("source_sop",): source.SOPInstanceUID,
        ("source_series",): header.SeriesInstanceUID,
        ("organisation",): derived_uid("cxr-worker-heatmap-dimensions", instance_uid),
    }
    top = {
        "SeriesInstanceUID": series_uid, "SOPInstanceUID": instance_uid, "SeriesNumber": series_number,
        "InstanceNumber": instance_number, "Rows": int(header.Rows), "Columns": int(header.Columns),
        "InstanceCreationDate": DA(now.date()), "InstanceCreationTime": TM(now.time()),
        "ContentDate": DA(now.date()), "ContentTime": TM(now.time()),
        "FrameOfReferenceUID": header.get("FrameOfReferenceUID"),
        "PositionReferenceIndicator": header.get("PositionReferenceIndicator"),
        "PatientOrientation": source.get("PatientOrientation") or None,
    }
    for keyword, value in top.items():
        values[("element", pydicom.tag.Tag(keyword))] = value
    for tag in kept.copied:
        values[("element", tag)] = header[tag]
    values[("element", _PIXEL_DATA)] = pydicom.DataElement(  # as dcmwrite writes it: OB, undefined length if encapsulated
        _PIXEL_DATA, "OB", _pixel_data(kept.dataset, levels), is_undefined_length=kept.encapsulated)
    return values


def _template(source: pydicom.Dataset, header: pydicom.Dataset, *, model: ModelInfo, manufacturer: str,
              frame: int | None, transfer_syntax_uid: str) -> tuple[pydicom.Dataset, tuple]:
    """highdicom's SEG for ``header`` at the stand-in size, without its pixels (the elements copied,
    not highdicom's decoding tables), and the source elements it copied (_source_elements)."""
    stand_in = pydicom.Dataset()
    for element in header:
        stand_in.add(element)
    del stand_in.Rows, stand_in.Columns  # new elements: the header's own stay as they are
    stand_in.Rows = stand_in.Columns = _STAND_IN_SIZE
    seg = _build_reference(source, stand_in, np.zeros((_STAND_IN_SIZE, _STAND_IN_SIZE), np.uint8), model=model,
                           series_uid="1.2.3", instance_uid="1.2.3.4", series_number=1, instance_number=1,
                           manufacturer=manufacturer, frame=frame, transfer_syntax_uid=transfer_syntax_uid)
    _template_counts["reference"] += 1
    template = pydicom.Dataset()
    for element in seg:
        if element.keyword != "PixelData":
            template.add(copy.deepcopy(element))
    template.file_meta = copy.deepcopy(seg.file_meta)
    template.set_original_encoding(False, True)
    return template, _source_elements(template, header)


def encode(ds: pydicom.Dataset) -> bytes:
    """A heatmap object as DICOM Part 10 bytes (its transfer syntax as built)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
