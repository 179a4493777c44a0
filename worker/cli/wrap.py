"""Wrap a JPEG/PNG chest film (e.g. a Kaggle image) as a DICOM DX For Presentation image.

For demos, `cxr-worker send --wrap` and tests: the films become real DICOM that any SCP, and the
worker itself, accept (dciodvfy reports no errors).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, DigitalXRayImageStorageForPresentation,
                         generate_uid)

from dicom_io.images import read_image_file
from dicom_io.kaggle import patient_from_name

from ..sr import derived_uid

#: The SOP class of a wrapped film.
DX_FOR_PRESENTATION = DigitalXRayImageStorageForPresentation
#: The wrapped images have no calibration; their Imager Pixel Spacing is a nominal value that
#: spreads the image's larger side over a typical paediatric chest field.
NOMINAL_FIELD_MM = 300.0
_CHEST = ("816094009", "SCT", "Chest")  # CID 4009 DX Anatomy Imaged (pydicom codes.SCT.Chest)
_AP_VIEW = ("399348003", "SCT", "antero-posterior")  # CID 4010 DX View


def content_seed(path: Path) -> str:
    """The SHA-256 of a file's bytes: the same film (wherever it lies, whatever its name) gives the same
    wrapped UIDs."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def wrap_image_as_dicom(
    path: Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_uid: str | None = None,
    uid_seed: str | None = None,
) -> Dataset:
    """Wrap a JPEG/PNG chest film as a DX For Presentation image (MONOCHROME2, 8 bit, AP chest).

    For demos and tests: the Kaggle films become real DICOM that any SCP and our own worker accept.
    Each file is its own study unless `study_uid` is given; the patient ID comes from the file name
    (dicom_io.kaggle: person123_bacteria_45.jpeg -> person123). The UIDs are random unless `uid_seed`
    is given: then the study (unless given), series and instance UIDs are derived from it (2.25 UIDs,
    worker.sr.derived_uid), so the same seed wraps to the same instance; `send --wrap` passes
    content_seed(path), which makes a resent film a duplicate, not a new study. With a seed the dates
    and times are the file's modification time rather than now, so wrapping the same file again gives
    the same bytes (a true duplicate, not "same UID, different content").
    Raises dicom_io.errors.DicomInputError for unreadable images.
    """
    path = Path(path)
    pixels = read_image_file(path)
    rows, columns = pixels.shape
    now = datetime.now() if uid_seed is None else datetime.fromtimestamp(path.stat().st_mtime)
    pid = patient_id or patient_from_name(path)[:64]  # LO: at most 64 characters
    if uid_seed is None:
        study_uid = study_uid or generate_uid()
        series_uid, sop_instance_uid = generate_uid(), generate_uid()
    else:
        study_uid = study_uid or derived_uid("cxr-worker-wrap-study", uid_seed)
        series_uid = derived_uid("cxr-worker-wrap-series", uid_seed, study_uid)
        sop_instance_uid = derived_uid("cxr-worker-wrap-instance", uid_seed, study_uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    text = f"{pid}{patient_name or ''}"
    ds.SpecificCharacterSet = "ISO_IR 100" if text.isascii() else "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Patient
    ds.PatientName = patient_name if patient_name is not None else f"DEMO^{pid}"
    ds.PatientID = pid
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "XR CHEST AP"
    # General Series / DX Series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Wrapped chest film"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = ""
    # General Image / DX Image / DX Anatomy Imaged / DX Positioning
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = f"Wrapped from a {path.suffix.lstrip('.').upper() or 'image'} file; geometry nominal"
    ds.PatientOrientation = ["L", "F"]  # AP film shown as usual: rows go to patient's left, columns to feet
    ds.ImageLaterality = "U"  # unpaired body part
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = _CHEST
    ds.AnatomicRegionSequence = DicomSequence([region])
    ds.ViewPosition = "AP"
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = _AP_VIEW
    view.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view])
    ds.PositionerType = ""
    ds.BurnedInAnnotation = "NO"
    if path.suffix.lower() in {".jpg", ".jpeg"}:  # the pixels went through lossy JPEG once
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    # DX Detector (no real detector: nominal spacing, see NOMINAL_FIELD_MM)
    ds.DetectorType = ""
    spacing = round(NOMINAL_FIELD_MM / max(rows, columns), 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    # Acquisition Context (Type 2)
    ds.AcquisitionContextSequence = DicomSequence([])
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds
