"""The worker's answer to the PACS: a TID 1500 Comprehensive 3D SR with one pneumonia finding.

One measurement group (TID 1501) per study says: finding Pneumonia, present/absent, and the model's
probability, measured by an identified algorithm (TID 4019) observed by a device whose UID is the
model's UID. Only standard codes (SCT, DCM, UCUM) are used, so any TID 1500 reader (highdicom, DCMTK,
PACS viewers) can show it. Which code means what, and why, is listed below with each constant.
The SR joins the images' study (patient and study modules copied from the sources) in a new series,
and carries the IHE AI Results (AIR) Contributing Equipment item that names the model.
What the SR says is a PneumoniaReport (worker/sr/report.py); the fast encoder, which builds on this
module, is worker/sr/template.py (encode_pneumonia_sr); the reader is worker/sr/reader.py.

Heatmap evidence (report.evidence, one item per mapped assessed image), each piece the way TID 1500
provides for it:

- **Where**: a TID 1410 Planar ROI group ("pneumonia region N") with the finding Pneumonia, the
  region as an SCOORD "Image Region" SELECTED FROM the source image (TID 1410 row "Image Region",
  highdicom ImageRegion + SourceImageForRegion), the image's Certainty of Finding in % (TID 1419
  ROI measurement) and the qualitative evaluation Present/Absent from that image's probability and
  the calibrated threshold. A closed polygon is written as graphic type POLYLINE whose last point
  repeats the first: that is how a 2D SCOORD states a polygon (PS3.3 C.18.6.1.2; POLYGON is a
  SCOORD3D type only, which needs a Frame of Reference projection radiographs mostly lack). Viewers
  that show TID 1500 measurements (OHIF, highdicom's get_planar_roi_measurement_groups) find it.
- **The Segmentation**: a second TID 1410 group ("pneumonia heatmap N") whose ROI is the "Referenced
  Segmentation Frame" (frame 1, segment 1) with its "Source image for segmentation". TID 1410 takes
  exactly one ROI reference per group (an image region OR a segmentation frame), and this row is
  TID 1500's own way to point at a 2D segment; TID 1411 (volumetric) would need a volume.
- **The key image**: an entry of the Image Library (TID 1600, the images the report references;
  highdicom puts the Secondary Capture, modality OT, in its own Image Library Group). TID 1410/1501
  have no row for an illustration of a finding, and calling the picture a "Source of Measurement"
  would misstate it. The reader pairs the library's key images with the regions in order, so a
  report has a key image for every evidence item or for none.
- Every object referenced is in the Current Requested Procedure Evidence Sequence (same study: PS3.3
  C.17.2.3 lists there the instances referenced in the content tree); highdicom writes it from the
  evidence data sets handed to Comprehensive3DSR (tests/worker/sr check that every reference resolves).

Without evidence the document is exactly what it was (the same groups, the same bytes).
"""

from __future__ import annotations

import copy
import io
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ._highdicom import attach_content, content_stub
from .report import SEGMENTATION_FRAME, SEGMENTATION_SEGMENT, HeatmapEvidence, PneumoniaReport, ReferencedObject
from .values import valid_source_values

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

#: "Not analysed": TID 1501 qualitative evaluations of the study group (and of each declined image's
#: group). DCM 111017 "CAD Processing and Findings Summary" takes a CID 6047 value: 111245 "No
#: algorithms succeeded; without findings" (no image assessed), 111244 / 111243 "Not all algorithms
#: succeeded; with / without findings" (a study mixing assessed and declined images).
CAD_SUMMARY: Code = codes.DCM.CADProcessingAndFindingsSummary
NONE_SUCCEEDED: Code = codes.DCM.NoAlgorithmsSucceededWithoutFindings
NOT_ALL_WITH_FINDINGS: Code = codes.DCM.NotAllAlgorithmsSucceededWithFindings
NOT_ALL_WITHOUT_FINDINGS: Code = codes.DCM.NotAllAlgorithmsSucceededWithoutFindings
#: Why an image was not assessed. DICOM has a code for an image that could not be read
#: (DCM 110531 "Insufficient quality for interpretation", CID 9303); for the others this worker's
#: local coding scheme (99CXRW, "99" = private per PS3.16 8.2), the code values being the short codes
#: of worker/scoring/intended_use.NotAssessed (SH: at most 16 characters).
LOCAL_SCHEME = "99CXRW"
REASON_NOT_ASSESSED = Code("not-assessed", LOCAL_SCHEME, "Reason not assessed")
REASON_CODES: dict[str, Code] = {
    "undecodable": codes.DCM.InsufficientQualityForInterpretation,
    "out_of_distribution": Code("ood", LOCAL_SCHEME, "Image unlike the training population (out of distribution)"),
    "modality": Code("modality", LOCAL_SCHEME, "Modality outside the intended use"),
    "body_part": Code("body-part", LOCAL_SCHEME, "Body part outside the intended use"),
    "view_position": Code("view-position", LOCAL_SCHEME, "View position outside the intended use"),
    "age": Code("age", LOCAL_SCHEME, "Patient age outside the intended use"),
    "not_eligible": Code("not-eligible", LOCAL_SCHEME, "Image not eligible for the algorithm"),
}
#: The detector's score of an image (a Mahalanobis distance, no units); its threshold is an algorithm parameter.
OOD_SCORE = Code("ood-score", LOCAL_SCHEME, "Out-of-distribution score")
STUDY_TRACKING_ID = "pneumonia"
DECLINED_TRACKING_ID = "pneumonia not assessed"
#: Tracking Identifiers of the heatmap groups (N: the evidence item, from 1).
REGION_TRACKING_ID = "pneumonia region"
SEGMENT_TRACKING_ID = "pneumonia heatmap"

SR_SERIES_DESCRIPTION = "AI pneumonia triage"
#: Type 2 patient/study attributes highdicom reads from the first source; absent ones become empty.
TYPE2_FROM_SOURCE = (
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
PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT"})


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


_PATIENT_SEX_TERMS = frozenset({"M", "F", "O"})


def evidence_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy with the Type 2 patient/study attributes highdicom expects present (maybe empty),
    and every source value the SR copies made valid or left empty (worker/sr/values.py)."""
    changes = {keyword: None for keyword in TYPE2_FROM_SOURCE if keyword not in ds}
    # Too long, undecodable, a bad format (highdicom converts dates with DA()/TM(), which raise on a
    # birth date "05.04.1923"): truncated or left empty (Type 2) rather than copied or no SR at all.
    changes.update(valid_source_values(ds))
    # highdicom accepts only the defined terms M/F/O: a "U" (seen in the wild) would cost the SR.
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    if sex and sex not in _PATIENT_SEX_TERMS:
        changes["PatientSex"] = None
    return _detached_copy(ds, changes)


def library_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy for the Image Library whose optional geometry descriptors highdicom can actually build.

    highdicom derives the TID 1603/1604 descriptors from Modality and fails on images that lack the
    geometry (e.g. a DX without Patient Orientation). Those descriptors are optional, so for such
    images the copy's Modality is set to one without geometry descriptors; the coded modality in
    the library still comes from the SOP Class.
    """
    modality = str(ds.get("Modality", "") or "")
    orientation = ds.get("PatientOrientation") or []
    spacing = ds.get("ImagerPixelSpacing") or []
    if modality in PROJECTION_MODALITIES:
        usable = len(orientation) == 2 and len(spacing) == 2
    elif modality in CROSS_SECTIONAL_MODALITIES:
        usable = all(ds.get(kw) for kw in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"))
    else:
        usable = True
    return _detached_copy(ds, {} if usable and modality else {"Modality": "OT"})


def _reason_evaluations(reasons) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name=REASON_NOT_ASSESSED, value=REASON_CODES.get(code, REASON_CODES["not_eligible"]))
            for code in dict.fromkeys(reasons)]


def _study_group(report: PneumoniaReport, algorithm) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's group: the finding (probability and present/absent) from the assessed images; or,
    with none assessed, "no algorithms succeeded; without findings" and the reasons."""
    sources = report.sources
    measurements, evaluations = [], []
    if report.assessed:
        measurements.append(hd.sr.Measurement(
            name=CERTAINTY_OF_FINDING,
            value=report.probability * 100.0,
            unit=PERCENT,
            algorithm_id=algorithm,
            referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(ds) for ds in sources],
        ))
        evaluations.append(hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if report.positive else ABSENT))
        if report.declined:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=CAD_SUMMARY, value=NOT_ALL_WITH_FINDINGS if report.positive else NOT_ALL_WITHOUT_FINDINGS))
    else:
        sources = report.all_sources
        evaluations.append(hd.sr.QualitativeEvaluation(name=CAD_SUMMARY, value=NONE_SUCCEEDED))
        evaluations += _reason_evaluations(code for item in report.declined for code in item.reasons)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=report.tracking_uid, identifier=STUDY_TRACKING_ID),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )


def _declined_group(report: PneumoniaReport, index: int, item, algorithm) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One declined image: no finding, its reasons, and its out-of-distribution score if it was scored."""
    measurements = []
    if item.ood_score is not None:
        measurements.append(hd.sr.Measurement(
            name=OOD_SCORE, value=float(item.ood_score), unit=NO_UNITS, algorithm_id=algorithm,
            referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(item.source)]))
    uid = pydicom.uid.generate_uid(prefix="2.25.", entropy_srcs=[report.sr_instance_uid, "declined",
                                                                  str(item.source.SOPInstanceUID)])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"{DECLINED_TRACKING_ID} {index + 1}"),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=CAD_SUMMARY, value=NONE_SUCCEEDED),
                                 *_reason_evaluations(item.reasons)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(item.source)],
    )


def evidence_tracking_uid(report: PneumoniaReport, kind: str, item: HeatmapEvidence) -> str:
    """A heatmap group's Tracking UID, from the SR's UID (stable across retries) and its image."""
    return pydicom.uid.generate_uid(prefix="2.25.", entropy_srcs=[report.sr_instance_uid, kind,
                                                                  str(item.source.SOPInstanceUID)])


def image_presence(report: PneumoniaReport, probability: float) -> Code:
    """Present/Absent for one image: its calibrated probability against the calibrated threshold
    (the study's decision rule, worker/scoring/runner.ModelRunner.label)."""
    return PRESENT if probability >= report.model.calibrated_threshold else ABSENT


def _region_group(report: PneumoniaReport, index: int, item: HeatmapEvidence, algorithm,
                  source: pydicom.Dataset) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """Where on the image (TID 1410: SCOORD on the source), its certainty and presence."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT if item.is_point else hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(item.region, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=evidence_tracking_uid(report, "heatmap region", item),
                                                     identifier=f"{REGION_TRACKING_ID} {index + 1}"),
        referenced_region=region,
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=item.probability * 100.0, unit=PERCENT,
                                        algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PNEUMONIA,
                                                             value=image_presence(report, item.probability))],
    )


def _segment_group(report: PneumoniaReport, index: int, item: HeatmapEvidence, algorithm,
                   source: pydicom.Dataset) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The heatmap Segmentation (TID 1410: Referenced Segmentation Frame of the source)."""
    seg = item.segmentation
    frame = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.sop_class_uid, sop_instance_uid=seg.sop_instance_uid,
        frame_number=SEGMENTATION_FRAME, segment_number=SEGMENTATION_SEGMENT,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(source))
    # highdicom writes both the frame and the segment number; the SR Image Reference Macro (PS3.3
    # C.18.4) allows Referenced Segment Number only where Referenced Frame Number is absent
    # (dciodvfy: "Shall not be present"). The frame of a one-segment Segmentation is its segment.
    del frame[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=evidence_tracking_uid(report, "heatmap segment", item),
                                                     identifier=f"{SEGMENT_TRACKING_ID} {index + 1}"),
        referenced_segment=frame,
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PNEUMONIA,
                                                             value=image_presence(report, item.probability))],
    )


def object_dataset(obj: ReferencedObject, study_uid: str) -> pydicom.Dataset:
    """What the SR needs of a heatmap object: its identity (evidence) and, for the key image, its
    size (Image Library entry; no geometry descriptors: modality OT)."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, obj.series_instance_uid
    ds.SOPClassUID, ds.SOPInstanceUID = obj.sop_class_uid, obj.sop_instance_uid
    if obj.rows is not None:
        ds.Modality, ds.Rows, ds.Columns = "OT", obj.rows, obj.columns
    return ds


def build_pneumonia_sr(report: PneumoniaReport, *, reference: bool = False) -> pydicom.Dataset:
    """Build the pneumonia SR that `report` describes, with highdicom.

    `reference=True` hands the content tree to highdicom's constructor unabridged (about twice as
    slow; the same bytes, see _highdicom.content_stub).
    """
    sources, model, manufacturer = report.sources, report.model, report.manufacturer
    everything = report.all_sources
    evidence = [evidence_copy(ds) for ds in everything]
    parameters = [f"arch={model.arch}", f"threshold={model.threshold:g}"]
    if model.calibration:  # the probability is calibrated: say so, and the threshold on that scale
        parameters.append(f"calibrated_threshold={model.calibrated_threshold:.6g}")
    if report.ood_threshold is not None:
        parameters.append(f"ood_threshold={report.ood_threshold:.6g}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        family=ALGORITHM_FAMILY,
        manufacturer=manufacturer,
    )
    groups = [_study_group(report, algorithm)]
    copies = {str(ds.SOPInstanceUID): ds for ds in evidence}
    study_uid = str(sources[0].StudyInstanceUID) if sources else ""
    objects, key_images = [], []
    for index, item in enumerate(report.evidence):
        source = copies[str(item.source.SOPInstanceUID)]
        groups.append(_region_group(report, index, item, algorithm, source))
        if item.segmentation is not None:
            groups.append(_segment_group(report, index, item, algorithm, source))
            objects.append(object_dataset(item.segmentation, study_uid))
        if item.key_image is not None:
            key_images.append(object_dataset(item.key_image, study_uid))
            objects.append(key_images[-1])
    groups += [_declined_group(report, index, item, algorithm) for index, item in enumerate(report.declined)]
    observer = hd.sr.ObserverContext(
        observer_type=CodedConcept.from_code(DEVICE_OBSERVER),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.uid,
            name=model.name,
            manufacturer_name=manufacturer,
            model_name=model.name,
        ),
    )
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[library_copy(ds) for ds in evidence] + key_images,
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
    root = measurement_report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence + objects,
        content=root if reference else content_stub(root),
        series_instance_uid=report.sr_series_uid,
        series_number=report.series_number,
        sop_instance_uid=report.sr_instance_uid,
        instance_number=report.instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # an unverified machine result: PRELIMINARY
        is_verified=False,
        institution_name=first.get("InstitutionName") or None,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model.name,
        software_versions=report.software_version,
        contributing_equipment=[equipment],
        specific_character_set=sr_character_set(first),
    )
    if not reference:
        attach_content(sr, root)
    return sr


def sr_file_bytes(sr: pydicom.Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, Explicit VR Little Endian data set)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def sr_character_set(source: pydicom.Dataset):
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
