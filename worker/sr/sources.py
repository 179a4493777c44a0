"""What the SR reads from its source images, kept from the moment each image is received.

The receiver parses each image's header once (worker/scoring/eligibility.read_header). Reading
SOURCE_TAGS as well in that same parse gives every attribute the SR will take from the image;
pack_source turns them into a few hundred bytes stored with the instance row, and the scorer builds
the SR from unpack_source of those bytes instead of parsing the file again. Rows stored before the
column existed (NULL) fall back to the file's header (source_dataset).

The elements are kept as they were read: raw, in the file's own encoding (Implicit or Explicit VR,
little or big endian), so that unpack_source gives back the same bytes, hence the same values, as
the file. tests/worker/sr/test_sr.py checks that the SR reads nothing outside SOURCE_TAGS and that
an SR from kept attributes equals the SR from the file, in every encoding.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.charset import default_encoding
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag

#: The image itself: its identity, and what the Image Library entry (TID 1601-1604) describes.
#: Pixel Representation: pydicom resolves the US/SS VRs of Implicit VR elements with it.
_IMAGE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
    "PixelRepresentation", "FrameOfReferenceUID", "PatientOrientation", "ImagerPixelSpacing", "PixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices",
)
#: The acquisition Contributing Equipment item highdicom adds from the first image, and the SR's
#: Institution Name.
_EQUIPMENT_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "InstitutionName",
    "InstitutionalDepartmentName", "InstitutionAddress", "StationName", "AcquisitionDateTime", "AcquisitionDate",
    "AcquisitionTime",
)
#: What Comprehensive3DSR copies from the first image (SOPClass.copy_patient_and_study_information):
#: the root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and
#: Clinical Trial Study modules, the union over every IOD in highdicom 0.28's tables.
_PATIENT_STUDY_KEYWORDS = (
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence",
    "StudyDescription", "ProcedureCodeSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "ReferencedStudySequence", "ReferencedPatientSequence", "PatientName",
    "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature",
    "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientSizeCodeSequence",
    "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension", "PatientWeight",
    "ReferencedPatientPhotoSequence", "MedicalAlerts", "Allergies", "EthnicGroupCodeSequence", "Occupation",
    "SmokingStatus", "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientSexNeutered", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientComments", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence", "IssuerOfClinicalTrialTimePointID", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "ConsentForClinicalTrialUseSequence", "StudyInstanceUID",
    "StudyID", "RequestingService", "RequestingServiceCodeSequence", "ReasonForVisit", "ReasonForVisitCodeSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState", "ReasonForPerformedProcedureCodeSequence",
)
#: Every attribute of a source image the SR reads, as tags (dcmread's specific_tags converts no keyword).
SOURCE_TAGS: tuple[BaseTag, ...] = tuple(sorted({Tag(kw) for kw in (*_IMAGE_KEYWORDS, *_EQUIPMENT_KEYWORDS,
                                                                     *_PATIENT_STUDY_KEYWORDS)}))
_KEPT = frozenset(SOURCE_TAGS)
#: The Patient and Study attributes among them (what highdicom copies into a derived object: the SR,
#: the heatmap SEG's template in worker/heatmap/segmentation.py).
PATIENT_STUDY_TAGS: frozenset[BaseTag] = frozenset(Tag(kw) for kw in _PATIENT_STUDY_KEYWORDS)
#: The first byte of pack_source's bytes: the encoding the elements are in, as (implicit VR, little endian).
_MARKS = {(True, True): b"I", (False, True): b"E", (False, False): b"B"}
_ENCODINGS = {mark[0]: encoding for encoding, mark in _MARKS.items()}


def pack_source(ds: pydicom.Dataset) -> bytes:
    """The SOURCE_TAGS elements of `ds` (a data set read from a file), as read, in a few hundred bytes."""
    mark = _MARKS.get(ds.original_encoding)
    if mark is None:
        raise ValueError(f"pack_source needs a data set read from a file, not one encoded {ds.original_encoding}")
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ds.original_encoding
    fp.write(mark)
    charset = ds.get("SpecificCharacterSet", default_encoding)  # for elements no longer raw
    for tag in sorted(ds.keys()):
        if tag in _KEPT:
            write_data_element(fp, ds.get_item(tag), charset)
    return fp.getvalue()


def unpack_source(data: bytes) -> pydicom.Dataset:
    """The data set pack_source kept."""
    encoding = _ENCODINGS.get(data[0]) if data else None
    if encoding is None:
        raise ValueError("not the bytes of pack_source")
    fp = DicomBytesIO(data)
    fp.seek(1)
    fp.is_implicit_VR, fp.is_little_endian = encoding
    return read_dataset(fp, *encoding)


def source_dataset(kept: bytes | None, path: str | Path) -> pydicom.Dataset:
    """One source image as the SR reads it: its kept attributes, else (kept None) the file's header."""
    if kept is not None:
        return unpack_source(kept)
    return pydicom.dcmread(path, stop_before_pixels=True)
