"""The worker's answer to the PACS: a TID 1500 Comprehensive 3D SR with one pneumonia finding.

One measurement group (TID 1501) per study says: finding Pneumonia, present/absent, and the model's
probability, measured by an identified algorithm (TID 4019) observed by a device whose UID is the
model's UID. Only standard codes (SCT, DCM, UCUM) are used, so any TID 1500 reader (highdicom, DCMTK,
PACS viewers) can show it. Which code means what, and why, is listed below with each constant.
The SR joins the images' study (patient and study modules copied from the sources) in a new series,
and carries the IHE AI Results (AIR) Contributing Equipment item that names the model.
The fast encoder is worker/sr_template.py (encode_pneumonia_sr); the reader is worker/sr_read.py
(read_pneumonia_sr).
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept, ContentSequence
from pydicom import config
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM, validate_value

from trainer.checkpoint import ModelInfo

def _package_version() -> str:
    try:
        return metadata.version("cxr-worker")
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "0.0.0"


PACKAGE_VERSION = _package_version()

# --- Codes (all standard; none private) -------------------------------------------------------
#: Finding (TID 1501 "Finding", DCM 121071) and name of the qualitative evaluation.
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
#: Qualitative evaluation values: CID 241 "Present-Absent Only".
PRESENT: Code = codes.SCT.Present  # SCT 52101004
ABSENT: Code = codes.SCT.Absent  # SCT 272519000
#: Probability concept: DCM 111012 "Certainty of Finding", the concept CAD SRs (TID 4104 chest/mammo
#: CAD single image finding, CID 6048) use for an algorithm's confidence in a finding, 0..100 %.
CERTAINTY_OF_FINDING: Code = codes.DCM.CertaintyOfFinding
PERCENT: Code = codes.UCUM.Percent  # UCUM "%"
NO_UNITS: Code = codes.UCUM.NoUnits  # UCUM "1" (accepted when reading)
#: Algorithm family (TID 4019 row "Algorithm Family"): DCM 123110 "Artificial Intelligence" (CID 7162).
ALGORITHM_FAMILY: Code = codes.DCM.ArtificialIntelligence
#: TID 1500 "Procedure reported": SCT 363679005 "Imaging procedure" (CID 100).
PROCEDURE_REPORTED: Code = codes.SCT.ImagingProcedure
#: Contributing Equipment purpose (CID 7005) for an AI model that derived this instance: DCM 109102.
PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment
#: Observer type (CID 270) for the model.
DEVICE_OBSERVER: Code = codes.DCM.Device

TRACKING_UID_ROOT = "2.25."
SR_SERIES_DESCRIPTION = "AI pneumonia triage"
DEFAULT_SERIES_NUMBER = 9901
#: Type 2 patient/study attributes highdicom reads from the first source; absent ones become empty.
_TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED_SOURCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT"})


def _check_sources(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    sources = list(sources)
    if not sources:
        raise ValueError("build_pneumonia_sr needs at least one source image")
    for index, ds in enumerate(sources):
        missing = [kw for kw in _REQUIRED_SOURCE_KEYWORDS if not ds.get(kw)]
        if missing:
            raise ValueError(f"source image #{index} lacks {', '.join(missing)}")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"all source images must belong to one study, got {len(studies)} StudyInstanceUIDs")
    instance_uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(instance_uids)) != len(instance_uids):
        raise ValueError("source images repeat a SOPInstanceUID")
    return sources


def _detached_copy(ds: pydicom.Dataset, changes: dict[str, Any]) -> pydicom.Dataset:
    """A shallow copy of `ds` with `changes` (keyword: value) in new elements. copy.copy of a pydicom
    Dataset shares its element dict, and setattr changes an existing element in place: either way
    the caller's dataset would change."""
    out = copy.copy(ds)
    out._dict = dict(ds._dict)
    for keyword, value in changes.items():
        if keyword in out:
            delattr(out, keyword)
        setattr(out, keyword, value)
    return out


#: Dates/times highdicom parses (and copies into the SR, e.g. the acquisition date-time into the
#: equipment item); a non-conformant one is left empty rather than fail the SR or its validation.
_CHECKED_DATES = (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM),
                  ("AcquisitionDateTime", DT), ("AcquisitionDate", DA), ("AcquisitionTime", TM))
_PATIENT_SEX_TERMS = frozenset({"M", "F", "O"})


def _evidence_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy with the Type 2 patient/study attributes highdicom expects present (maybe empty)."""
    changes = {keyword: None for keyword in _TYPE2_FROM_SOURCE if keyword not in ds}
    # highdicom converts these with DA()/TM(), which raise on a non-conformant value (e.g. a birth
    # date "05.04.1923"): leave such a value empty (Type 2) rather than send no SR at all.
    for keyword, vr_class in _CHECKED_DATES:
        value = ds.get(keyword)
        if value:
            try:
                text = str(value).strip()
                validate_value(vr_class.__name__, text, config.RAISE)  # PS3.5 format ...
                vr_class(text)                                         # ... and a real date/time
            except ValueError:
                changes[keyword] = None
    # highdicom accepts only the defined terms M/F/O: a "U" (seen in the wild) would cost the SR.
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    if sex and sex not in _PATIENT_SEX_TERMS:
        changes["PatientSex"] = None
    return _detached_copy(ds, changes)


def _library_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy for the Image Library whose optional geometry descriptors highdicom can actually build.

    highdicom derives the TID 1603/1604 descriptors from Modality and fails on images that lack the
    geometry (e.g. a DX without Patient Orientation). Those descriptors are optional, so for such
    images the copy's Modality is set to one without geometry descriptors; the coded modality in
    the library still comes from the SOP Class.
    """
    modality = str(ds.get("Modality", "") or "")
    orientation = ds.get("PatientOrientation") or []
    spacing = ds.get("ImagerPixelSpacing") or []
    if modality in _PROJECTION_MODALITIES:
        usable = len(orientation) == 2 and len(spacing) == 2
    elif modality in _CROSS_SECTIONAL_MODALITIES:
        usable = all(ds.get(kw) for kw in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"))
    else:
        usable = True
    return _detached_copy(ds, {} if usable and modality else {"Modality": "OT"})


def _tracking_uid(sr_instance_uid: str) -> str:
    """Derived from the SR's UID, so a retried SR carries the same measurement group identity."""
    return pydicom.uid.generate_uid(prefix=TRACKING_UID_ROOT, entropy_srcs=[sr_instance_uid, "pneumonia"])


def _check_uid(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a valid DICOM UID")
    return str(value)


def _checked_arguments(
    sources: Sequence[pydicom.Dataset],
    probability: float,
    model: ModelInfo,
    series_number: int,
    instance_number: int,
    sr_series_uid: str | None,
    sr_instance_uid: str | None,
) -> tuple[list[pydicom.Dataset], float, str, str]:
    """The checks both SR paths make first: (sources, probability, SR series UID, SR instance UID)."""
    sources = _check_sources(sources)
    probability = float(probability)
    if not 0.0 <= probability <= 1.0:  # also rejects NaN
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a trainer.checkpoint.ModelInfo, got {type(model).__name__}")
    if series_number < 1 or instance_number < 1:
        raise ValueError("series_number and instance_number must be positive")
    series_uid = _check_uid(sr_series_uid, "sr_series_uid") or hd.UID()
    instance_uid = _check_uid(sr_instance_uid, "sr_instance_uid") or hd.UID()
    if series_uid == instance_uid:
        raise ValueError("sr_series_uid and sr_instance_uid must differ")
    return sources, probability, series_uid, instance_uid


def build_pneumonia_sr(
    sources: Sequence[pydicom.Dataset],
    probability: float,
    positive: bool,
    model: ModelInfo,
    *,
    manufacturer: str = "cxr-worker",
    software_version: str = PACKAGE_VERSION,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    sr_series_uid: str | None = None,
    sr_instance_uid: str | None = None,
    reference: bool = False,
) -> pydicom.Dataset:
    """Build the pneumonia SR for one study's eligible images.

    `probability` is the model's output in [0, 1] (stored as Certainty of Finding in %), `positive`
    the thresholded decision. Pass `sr_series_uid`/`sr_instance_uid` (derived from the study) so a
    retry produces the same SR instead of a duplicate. `reference=True` hands the content tree to
    highdicom's constructor unabridged (about twice as slow; the same bytes, see _content_stub).
    """
    sources, probability, series_uid, instance_uid = _checked_arguments(
        sources, probability, model, series_number, instance_number, sr_series_uid, sr_instance_uid
    )
    evidence = [_evidence_copy(ds) for ds in sources]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"arch={model.arch}", f"threshold={model.threshold:g}"],
        family=ALGORITHM_FAMILY,
        manufacturer=manufacturer,
    )
    probability_measurement = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING,
        value=probability * 100.0,
        unit=PERCENT,
        algorithm_id=algorithm,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(ds) for ds in sources],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(instance_uid), identifier="pneumonia"
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=[probability_measurement],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if positive else ABSENT)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    observer = hd.sr.ObserverContext(
        observer_type=CodedConcept.from_code(DEVICE_OBSERVER),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.uid,
            name=model.name,
            manufacturer_name=manufacturer,
            model_name=model.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
        referenced_images=[_library_copy(ds) for ds in evidence],
    )
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_description="AI pneumonia triage (chest radiograph classification)",
    )
    equipment.DeviceUID = model.uid  # (0018,1002): IHE AIR identifies the model by this UID
    first = evidence[0]
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root if reference else _content_stub(root),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # an unverified machine result: PRELIMINARY
        is_verified=False,
        institution_name=first.get("InstitutionName") or None,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model.name,
        software_versions=software_version,
        contributing_equipment=[equipment],
        specific_character_set=_sr_character_set(first),
    )
    if not reference:
        for tag, element in root.items():  # what the constructor does with the content it is given
            sr[tag] = element
        sr._content = ContentSequence([root], is_root=True)  # what .content returns
    return sr


def sr_file_bytes(sr: pydicom.Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, Explicit VR Little Endian data set)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_pneumonia_sr(
    sources: Sequence[pydicom.Dataset],
    probability: float,
    positive: bool,
    model: ModelInfo,
    *,
    manufacturer: str = "cxr-worker",
    software_version: str = PACKAGE_VERSION,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    sr_series_uid: str | None = None,
    sr_instance_uid: str | None = None,
) -> bytes:
    """sr_file_bytes(build_pneumonia_sr(...)) in 1-3 ms instead of 20-45: rendered from the template
    that the first study of the same shape made (worker/sr_template.py), else built by highdicom.
    Same arguments and checks; only the creation date/times differ."""
    from . import template as sr_template  # it builds on this module

    return sr_template.encode(sources, probability, positive, model, manufacturer=manufacturer,
                              software_version=software_version, series_number=series_number,
                              instance_number=instance_number, sr_series_uid=sr_series_uid,
                              sr_instance_uid=sr_instance_uid)


def _content_stub(root: pydicom.Dataset) -> pydicom.Dataset:
    """The root container's own attributes without its children, for Comprehensive3DSR().

    The constructor deep-copies and re-parses the whole content tree (for ``.content``) and walks
    it twice to check that every referenced image is in ``evidence``: about half of the cost of an
    SR. Our tree references only the sources, which are the evidence, so build_pneumonia_sr passes
    this stub and attaches the tree afterwards the way the constructor does (its top-level
    attributes copied into the document). tests/test_sr.py checks both paths give the same bytes.
    """
    stub = pydicom.Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            stub.add(element)
    stub.ContentSequence = []
    return stub


def _sr_character_set(source: pydicom.Dataset):
    """The source's Specific Character Set when highdicom takes it, else UTF-8 (ISO_IR 192).

    highdicom refuses valid values such as "\\ISO 2022 IR 87" (empty first value) and unknown ones;
    the text it copies (patient name...) was decoded by pydicom already, so UTF-8 always holds it.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    known = {str(v.value) for v in hd.enum.SpecificCharacterSetValues}
    return value if values and all(v in known for v in values) else "ISO_IR 192"
