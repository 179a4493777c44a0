"""The displayable picture: an RGB Secondary Capture key image of the heatmap (overlay.key_picture).

Every PACS and viewer displays an 8-bit RGB Secondary Capture, so this is the object a reader sees
whatever their viewer reads of SEG. It is a new series of the source's study with the source's
Patient and Study modules (highdicom's copy, as for the SR), Image Type DERIVED\\SECONDARY, Burned In
Annotation YES (the warning, the finding and the model are in the pixels), and the source image
referenced in the Source Image Sequence with the Derivation Description saying what was done.

Encoded as JPEG Baseline (Process 1, YBR_FULL_422, the colour JPEG every DICOM viewer and PACS
decodes; Lossy Image Compression 01 with its ratio and method): about 0.1 MB at 1024 x 730 instead
of 2.2 MB uncompressed, for 5 ms (highdicom encodes it with Pillow). The picture is a derived
illustration, not the diagnostic image; the burned-in text stays legible, and the 2 MB saved per
image is disk, fsync and network time every positive study pays (benchmarks/bench_ingest.py).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import JPEGBaseline8Bit
from pydicom.valuerep import DA, DT, TM

from trainer.model_info import ModelInfo
from worker.sr.byte_template import Template
from worker.sr.sources import PATIENT_STUDY_TAGS

from .segmentation import (
    CHARACTER_SET, _equipment_values, _mark_equipment, acquisition_equipment, encode, highdicom_source,
)

log = logging.getLogger("cxr_worker.heatmap")

SERIES_DESCRIPTION = "AI heatmap key image, not for diagnosis"
DERIVATION_DESCRIPTION = "AI heatmap (HiResCAM) of the pneumonia classifier blended into the windowed source image"
#: Purpose of reference of the source image: CID 7202 "Source image for image processing operation".
SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation
#: highdicom's SCImage takes an orientation for its PATIENT coordinate system; a source without Patient
#: Orientation gets an empty one (Type 2C) after construction, so this value is never written.
_ANY_ORIENTATION = ("L", "F")


def build_key_image(source: pydicom.Dataset, picture_rgb: np.ndarray, *, model: ModelInfo, series_uid: str,
                    instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                    frame: int | None = None, header: pydicom.Dataset | None = None) -> pydicom.Dataset:
    """The RGB SC of ``picture_rgb`` ((rows, cols, 3) uint8) for ``source`` (its header); ``header``:
    segmentation.highdicom_source(source), where the caller has it already."""
    picture = np.asarray(picture_rgb)
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(f"picture_rgb must be (rows, cols, 3) uint8, got {picture.dtype} {picture.shape}")
    if frame is not None and int(frame) < 1:
        raise ValueError(f"frame must be a 1-based frame number, got {frame}")
    header = highdicom_source(source) if header is None else header
    orientation = list(source.get("PatientOrientation") or [])
    # SCImage.from_ref_dataset's mapping of the source, with the acquisition equipment made once per
    # SOP class check (segmentation.acquisition_equipment: highdicom's item, 2 ms cheaper)
    acquisition = acquisition_equipment(header)
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(picture), photometric_interpretation="YBR_FULL_422",
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=instance_uid, instance_number=instance_number, manufacturer=manufacturer,
        patient_id=header.get("PatientID"), patient_name=header.get("PatientName"),
        patient_birth_date=header.get("PatientBirthDate"), patient_sex=header.get("PatientSex"),
        accession_number=header.get("AccessionNumber"), study_id=header.get("StudyID"),
        study_date=header.get("StudyDate"), study_time=header.get("StudyTime"),
        referring_physician_name=header.get("ReferringPhysicianName"),
        patient_orientation=tuple(orientation) if len(orientation) == 2 else _ANY_ORIENTATION,
        contributing_equipment=[acquisition] if acquisition is not None else None,
        manufacturer_model_name=model.name, software_versions=model.version, device_serial_number=model.uid,
        series_description=SERIES_DESCRIPTION, specific_character_set=CHARACTER_SET,
        transfer_syntax_uid=JPEGBaseline8Bit,  # module docstring: why lossy is right for this picture
    )
    sc.copy_patient_and_study_information(header)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "01"  # General Image: set once lossy compression was applied
    sc.LossyImageCompressionRatio = round(picture.nbytes / max(1, len(sc.PixelData)), 2)
    sc.LossyImageCompressionMethod = "ISO_10918_1"
    sc.RecognizableVisualFeatures = "NO"
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = int(frame)
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_PURPOSE)]
    sc.SourceImageSequence = [reference]
    sc.PatientOrientation = orientation or None  # Type 2C: the source's, or empty when it has none
    # General Series Laterality, Type 2C (a paired body part, unknown here): empty, the film shows both sides
    sc.Laterality = None
    return sc


def key_image_jpeg(sc: pydicom.Dataset) -> bytes:
    """The key image's JPEG Baseline frame as a JPEG file (a browser shows it as it is: the web page's
    picture, the same pixels as the key image)."""
    if sc.file_meta.TransferSyntaxUID != JPEGBaseline8Bit:
        raise ValueError(f"the key image is not JPEG Baseline: {sc.file_meta.TransferSyntaxUID}")
    return next(generate_frames(sc.PixelData, number_of_frames=1))


# --- The fast path: later key images of the same shape spliced into the first one's bytes ---------------
#: Templates kept (one per source shape, model and options), as for the SEG.
TEMPLATE_CACHE_SIZE = 32
_templates: dict[tuple, "_Kept | None"] = {}
#: The stand-in picture a template is built from (its size and pixels are slots).
_STAND_IN = np.zeros((16, 16, 3), np.uint8)
#: The key image's clock values (highdicom's now(), at construction).
_CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "DateOfSecondaryCapture",
          "TimeOfSecondaryCapture")
_ARGUMENTS = ("SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber")
_PER_IMAGE = ("Rows", "Columns", "LossyImageCompressionRatio", "PatientOrientation", "PixelData")
_SLOTS = frozenset(Tag(k) for k in (*_CLOCK, *_ARGUMENTS, *_PER_IMAGE))
_COPIED = PATIENT_STUDY_TAGS | {Tag("StudyInstanceUID")}


@dataclass(frozen=True)
class _Kept:
    bytes: Template
    acquisition: bool  # its equipment names the source's acquisition equipment (_mark_equipment)


def clear_key_image_templates() -> None:
    _templates.clear()


def key_image_template_info() -> dict[str, int]:
    """How many key-image templates are kept, and how many shapes fell back to highdicom (None)."""
    return {"templates": sum(k is not None for k in _templates.values()),
            "fallbacks": sum(k is None for k in _templates.values())}


def jpeg_frame(picture_rgb: np.ndarray) -> bytes:
    """The picture as the key image's JPEG Baseline frame, encoded as highdicom's SCImage encodes it."""
    return hd.frame.encode_frame(np.ascontiguousarray(picture_rgb), transfer_syntax_uid=JPEGBaseline8Bit,
                                 bits_allocated=8, bits_stored=8, photometric_interpretation="YBR_FULL_422",
                                 pixel_representation=0, planar_configuration=0)


def encode_key_image(source: pydicom.Dataset, picture_rgb: np.ndarray, *, model: ModelInfo, series_uid: str,
                     instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                     frame: int | None = None, header: pydicom.Dataset | None = None) -> tuple[bytes, bytes]:
    """``encode(build_key_image(...))`` and its JPEG frame (the web page's picture): the same bytes up
    to the clock values (tested), from the shape's byte template (worker/sr/byte_template.py, as for
    the SR and the SEG): only the ~25 values that are the image's own are encoded, beside the JPEG,
    instead of highdicom's construction and pydicom's writer (~6 ms of a key image's ~9)."""
    picture = np.asarray(picture_rgb)
    header = highdicom_source(source) if header is None else header
    key = (str(header.SOPClassUID), frozenset(header.keys()), model.uid, model.name, model.version, manufacturer,
           frame)
    if key not in _templates:
        if len(_templates) >= TEMPLATE_CACHE_SIZE:
            _templates.clear()
        _templates[key] = _byte_template(source, header, model=model, manufacturer=manufacturer, frame=frame)
    kept = _templates[key]
    ids = dict(series_uid=series_uid, instance_uid=instance_uid, series_number=series_number,
               instance_number=instance_number)
    acquisition = acquisition_equipment(header)
    if (kept is None or picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8
            or (acquisition is not None) != kept.acquisition):
        # no template for this shape, a source naming its acquisition equipment where the template's
        # did not (or the reverse), or a picture build_key_image refuses (with its message)
        sc = build_key_image(source, picture, model=model, manufacturer=manufacturer, frame=frame, header=header,
                             **ids)
        return encode(sc), key_image_jpeg(sc)
    now = datetime.datetime.now()
    values = _slot_values(source, header, picture, jpeg_frame(picture), now=now, acquisition=acquisition,
                          contribution=DT(now), **ids)
    return kept.bytes.render(values.__getitem__), next(generate_frames(values[("element", Tag("PixelData"))].value,
                                                                         number_of_frames=1))


def _slot_values(source: pydicom.Dataset, header: pydicom.Dataset, picture: np.ndarray, jpeg: bytes, *,
                 series_uid: str, instance_uid: str, series_number: int, instance_number: int,
                 now: datetime.datetime | dict, acquisition: hd.ContributingEquipment | None,
                 contribution) -> dict[tuple, object]:
    """What build_key_image sets per image, slot by slot (``now``: a time, or the clock values by keyword;
    ``acquisition``: acquisition_equipment(header); ``contribution``: highdicom's equipment item's clock)."""
    pixel_data = encapsulate([jpeg])
    if isinstance(now, dict):
        clock = now
    else:
        date, time = DA(now.date()), TM(now.time())
        clock = {k: (date if k.endswith("Date") or k == "DateOfSecondaryCapture" else time) for k in _CLOCK}
    top = {
        **clock, "SOPInstanceUID": instance_uid, "SeriesInstanceUID": series_uid, "SeriesNumber": series_number,
        "InstanceNumber": instance_number, "Rows": int(picture.shape[0]), "Columns": int(picture.shape[1]),
        "LossyImageCompressionRatio": round(picture.nbytes / max(1, len(pixel_data)), 2),
        "PatientOrientation": list(source.get("PatientOrientation") or []) or None,
        "PixelData": pydicom.DataElement(Tag("PixelData"), "OB", pixel_data, is_undefined_length=True),
    }
    values: dict[tuple, object] = {("element", Tag(k)): v for k, v in top.items()}
    values.update(_equipment_values(acquisition, contribution))
    values[("instance",)] = instance_uid
    values[("source_sop",)] = header.SOPInstanceUID
    for tag in _COPIED:
        if tag in header:
            values[("element", tag)] = header[tag]
    return values


def _byte_template(source: pydicom.Dataset, header: pydicom.Dataset, *, model: ModelInfo, manufacturer: str,
                   frame: int | None) -> _Kept | None:
    """highdicom's key image of a stand-in picture cut into constant runs and slots (the clock, the
    arguments, the size, ratio, orientation, equipment and pixels, the copied patient/study elements,
    the source's instance UID in the Source Image Sequence, the file meta's instance UID). None (highdicom
    builds every key image of this shape) unless it gives back, for a probe with other values, the
    bytes pydicom writes for build_key_image's object, with none of the source's UIDs in its constants."""
    ids = dict(series_uid="2.25.11", instance_uid="2.25.12", series_number=5, instance_number=2)
    sc = build_key_image(source, _STAND_IN, model=model, manufacturer=manufacturer, frame=frame, header=header, **ids)
    sc.PixelData = b""  # a slot
    marks: dict[int, tuple] = {}
    for element in sc:
        if element.tag in _SLOTS or (element.tag in _COPIED and element.tag in header):
            marks[id(element)] = ("element", element.tag)
    for item in sc.SourceImageSequence:
        marks[id(item["ReferencedSOPInstanceUID"])] = ("source_sop",)
    marks[id(sc.file_meta["MediaStorageSOPInstanceUID"])] = ("instance",)
    acquisition = _mark_equipment(sc, marks)
    parts = Template.cut(sc, marks)
    # the probe: another picture and other values, built by highdicom; the clock and highdicom's equipment
    # item (it carries the clock too) taken from it
    picture = np.full((24, 40, 3), (200, 30, 90), np.uint8)
    probe_ids = dict(series_uid="2.25.21", instance_uid="2.25.22", series_number=8, instance_number=4)
    probe = build_key_image(source, picture, model=model, manufacturer=manufacturer, frame=frame, header=header,
                            **probe_ids)
    values = _slot_values(source, header, picture, jpeg_frame(picture), now={k: probe[k].value for k in _CLOCK},
                          acquisition=acquisition_equipment(header), contribution=probe.ContributingEquipmentSequence[-1].get("ContributionDateTime"),
                          **probe_ids)
    if parts.render(values.__getitem__) != encode(probe):
        log.warning("key image byte template for %s does not give highdicom's bytes back; highdicom builds "
                    "these key images", header.SOPClassUID)
        return None
    uids = [str(header.get(k)) for k in ("SOPInstanceUID", "StudyInstanceUID") if header.get(k)]
    if parts.leaks(uids + [ids["series_uid"], ids["instance_uid"]]):
        log.warning("key image byte template for %s leaves a per-image UID in its constant bytes; highdicom "
                    "builds these key images", header.SOPClassUID)
        return None
    return _Kept(parts, acquisition)
