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

import highdicom as hd
import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit

from trainer.model_info import ModelInfo

from .segmentation import CHARACTER_SET, acquisition_equipment, highdicom_source

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
