"""An out-of-distribution set from the images pydicom-data ships, re-wrapped so that only pixels can tell.

Each source image (extremity CR, MR, CT, US, NM, secondary captures) is decoded by dicom_io exactly as
the worker decodes it, written as a lossless PNG, and that PNG wrapped by worker/cli/wrap.py as a
CHEST DX For Presentation film with ViewPosition PA and no birth date: every header check of the
intended use passes, so only the pixel detector can decline them. The PNG beside each file is the
same picture for the JPEG/PNG path (classify's "same ood_score" test).

The adult chest CR (RG1_UNCR.dcm, born 1940, studied 2004) is not in this set: it is out of
*population*, which its header says (age), not necessarily its pixels; tests use it as it is.

    python -m tests.testkit.ood_set DIR     # the set for `cxr-train fit-ood --ood DIR`
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: pydicom-data files, each with what it really is (name -> description).
SOURCES = {
    "RG3_UNCR.dcm": "CR extremity (hand)",
    "MR2_UNCR.dcm": "MR head slice",
    "MR_small.dcm": "MR small",
    "emri_small.dcm": "MR head, multi-frame (first frame)",
    "MR-SIEMENS-DICOM-WithOverlays.dcm": "MR abdomen",
    "CT_small.dcm": "CT slice",
    "693_UNCR.dcm": "CT slice",
    "US1_UNCR.dcm": "ultrasound (RGB)",
    "OBXXXX1A.dcm": "obstetric ultrasound (palette colour)",
    "color3d_jpeg_baseline.dcm": "ultrasound cine (first frame)",
    "JPEG2000.dcm": "NM whole body",
    "SC_rgb.dcm": "secondary capture colour bars",
    "OT-PAL-8-face.dcm": "secondary capture photograph (face)",
    "vlut_04.dcm": "secondary capture with VOI LUT",
}
#: Out of population by the header (age), a real chest film.
ADULT_CHEST = "RG1_UNCR.dcm"
PA_VIEW = ("399198007", "SCT", "postero-anterior")  # CID 4010


@dataclass(frozen=True)
class OODCase:
    name: str
    description: str
    dicom: Path
    png: Path


def source_path(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_testdata_file(name)
    if not found:
        raise FileNotFoundError(f"pydicom-data has no {name}")
    return Path(found)


def _grey(path: Path, load_display_image) -> "np.ndarray":
    """dicom_io's display image; colour images (which dicom_io declines) made grey by pydicom first."""
    from dicom_io import DicomInputError
    from dicom_io.images import gray_from_array
    import pydicom
    from pydicom.pixels import apply_color_lut

    try:
        return load_display_image(path).pixels
    except DicomInputError:
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        array = ds.pixel_array
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            array = apply_color_lut(array, ds)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            array = array[0]
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) * 255.0 / max(1.0, float(array.max()))).astype(np.uint8)
        return gray_from_array(array)


def build_ood_set(out_dir: str | Path) -> list[OODCase]:
    """Write ``<stem>.dcm`` (CHEST PA DX) and ``<stem>.png`` per source into ``out_dir``."""
    from dicom_io import load_display_image
    from worker.cli.wrap import content_seed, wrap_image_as_dicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    out = Path(out_dir)
    (out / "png").mkdir(parents=True, exist_ok=True)
    cases = []
    for name, description in SOURCES.items():
        pixels = _grey(source_path(name), load_display_image)
        stem = Path(name).stem
        png = out / "png" / f"{stem}.png"
        Image.fromarray(pixels).save(png)
        ds = wrap_image_as_dicom(png, patient_id=f"OOD-{stem}"[:64], patient_name="OOD^TEST",
                                 uid_seed=content_seed(png))
        ds.ViewPosition = "PA"
        view = Dataset()
        view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = PA_VIEW
        view.ViewModifierCodeSequence = DicomSequence([])
        ds.ViewCodeSequence = DicomSequence([view])
        ds.StudyDescription = "XR CHEST PA"
        dcm = out / f"{stem}.dcm"
        ds.save_as(dcm, enforce_file_format=True)
        cases.append(OODCase(stem, description, dcm, png))
    return cases


if __name__ == "__main__":
    for case in build_ood_set(sys.argv[1] if len(sys.argv) > 1 else "runs/ood_set"):
        print(case.dicom, case.description)


def checkpoint_without_detector(path: str | Path) -> Path:
    """The shipped weights as a format-1 checkpoint (no intended use, calibrator or detector), for
    tests whose images are synthetic pictures on purpose (hostile bytes, not pixels): the detector
    would, rightly, decline them. The real model's behaviour is tests/system/test_intended_use.py's."""
    from dataclasses import asdict

    from trainer.checkpoint import ModelInfo, read_model_info, rewrite_checkpoint
    from worker.settings import DEFAULT_MODEL

    info = read_model_info(DEFAULT_MODEL)
    plain = ModelInfo(**{**asdict(info), "intended_use": {}, "calibration": {}, "ood": {}, "format_version": 1})
    return rewrite_checkpoint(DEFAULT_MODEL, plain, Path(path))
