"""A DICOM file or dataset -> 8-bit display image of a chest radiograph, or a specific DicomInputError.

Order of work: parse -> check the Image Pixel module (cheap, before any decoding) -> decode frame 0
(``decode.py``) -> modality LUT, VOI, MONOCHROME1 inversion (``render.py`` / ``lut.py``).
Every failure, including a decoder's own exception, leaves as DicomInputError(reason, message):

==========================  =============================================================
reason                      meaning
==========================  =============================================================
not_dicom                   no DICOM file structure (no "DICM" preamble/meta), unreadable
truncated_file              the file ends inside its data set (nothing usable was read)
no_pixel_data               no Pixel Data element (e.g. an SR, a KOS, a PR)
unsupported_pixel_format    Float/Double Float Pixel Data, or Bits Allocated not 8/16/32
unsupported_photometric     not MONOCHROME1/2 with one sample per pixel (RGB, YBR, PALETTE)
bad_dimensions              Rows/Columns/Number of Frames missing, zero or > MAX_SIDE
truncated_pixel_data        native Pixel Data shorter than Rows x Columns x ... declare
unsupported_transfer_syntax no decoder for the transfer syntax
decode_failed               every installed decoder failed on the compressed data
bad_lut                     a Modality/VOI LUT Sequence that cannot be applied (short LUT Data)
bad_rescale                 Rescale Slope 0, or a Rescale Slope/Intercept that is NaN, inf, not a number
                            or multi-valued (docs/pixel_path.md; checked before decoding)
==========================  =============================================================

RGB is refused on purpose: DX/CR radiographs are grey-scale by definition (PS3.3 C.8.11.3.1.1,
C.8.1.2.1), and a colour capture is a photograph or screenshot whose grey levels the model was
never validated on.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .decode import NATIVE_SYNTAXES, decode_first_frame, transfer_syntax_of
from .errors import DicomInputError
from .lut import rescale_parameters
from .render import PixelFormat, render_display
from .types import DisplayImage

MAX_SIDE = 16384
"""Largest Rows/Columns accepted; real detectors are <= ~4300 px, so more means a corrupt header."""
GREY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
SUPPORTED_BITS_ALLOCATED = frozenset({8, 16, 32})
PRESENTATION_SHAPES = frozenset({"IDENTITY", "INVERSE"})


def read_dataset(source: str | Path | Dataset) -> Dataset:
    """Parse a file (or take a dataset as is); classify what cannot be parsed."""
    if isinstance(source, Dataset):
        return source
    try:
        ds = pydicom.dcmread(source)
    except (InvalidDicomError, EOFError) as exc:
        raise DicomInputError("not_dicom", f"{Path(source).name} is not a DICOM file: {exc}") from exc
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same answer for the caller
        raise DicomInputError("not_dicom", f"cannot parse {Path(source).name}: {exc}") from exc
    if len(ds) == 0:  # pydicom drops the whole data set when the file ends inside an element
        raise DicomInputError("truncated_file", f"{Path(source).name} ends before its data set could be read")
    return ds


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def check_image(ds: Dataset) -> tuple[PixelFormat, int, list[str]]:
    """Validate the Image Pixel module before decoding; return (format, number of frames, notes)."""
    notes: list[str] = []
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomInputError("unsupported_pixel_format", "Float Pixel Data is not a radiograph's pixel data")
        raise DicomInputError("no_pixel_data", f"no Pixel Data (Modality {ds.get('Modality', '?')}, "
                                               f"SOP Class {ds.get('SOPClassUID', '?')})")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric and samples == 1:
        photometric = "MONOCHROME2"
        notes.append("no Photometric Interpretation: MONOCHROME2 assumed")
    if samples != 1 or photometric not in GREY_PHOTOMETRICS:
        raise DicomInputError("unsupported_photometric",
                              f"{photometric or '?'} with {samples} sample(s) per pixel: a chest radiograph "
                              "input must be grey-scale MONOCHROME1/MONOCHROME2")
    rows, cols, frames = _int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "NumberOfFrames", 1)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE) or frames < 1:
        raise DicomInputError("bad_dimensions", f"Rows={rows} Columns={cols} Frames={frames}: need 1..{MAX_SIDE} "
                                                "per side and at least one frame")
    bits_allocated = _int(ds, "BitsAllocated", 0)
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED or not 0 < bits_stored <= bits_allocated:
        raise DicomInputError("unsupported_pixel_format",
                              f"Bits Allocated {bits_allocated}, Bits Stored {bits_stored} not supported")
    fmt = PixelFormat(bits_allocated=bits_allocated, bits_stored=bits_stored,
                      signed=_int(ds, "PixelRepresentation", 0) == 1, invert=_inverts(ds, photometric, notes))
    if not ds.get("ModalityLUTSequence"):  # the sequence, when present, replaces the rescale (C.11.1)
        rescale_parameters(ds)  # bad_rescale before any decoding
    return fmt, frames, notes


def _inverts(ds: Dataset, photometric: str, notes: list[str]) -> bool:
    """Polarity of the display: MONOCHROME1 inverts, unless a Presentation LUT Shape says otherwise.

    The Presentation LUT Shape is the last stage of C.11 (C.11.6) and, when present, decides
    (DX requires INVERSE for MONOCHROME1 and IDENTITY for MONOCHROME2, C.8.11.7); DCMTK does the same.
    """
    by_photometric = photometric == "MONOCHROME1"
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape not in PRESENTATION_SHAPES:
        return by_photometric
    by_shape = shape == "INVERSE"
    if by_shape != by_photometric:
        notes.append(f"Presentation LUT Shape {shape} on {photometric}: display {'in' if by_shape else 'not in'}verted")
    return by_shape


def _check_native_length(ds: Dataset, fmt: PixelFormat, frames: int) -> None:
    """Native Pixel Data must hold every declared frame (an interrupted transfer usually fails here)."""
    expected = int(ds.Rows) * int(ds.Columns) * frames * fmt.bits_allocated // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise DicomInputError("truncated_pixel_data",
                              f"Pixel Data has {actual} bytes, {ds.Rows}x{ds.Columns}x{frames} frame(s) of "
                              f"{fmt.bits_allocated}-bit need {expected}: truncated file or wrong header")


def read_dicom_display(source: str | Path | Dataset) -> DisplayImage:
    """Decode, modality LUT, VOI, MONOCHROME1 inversion -> uint8 display image (first frame only).

    Raises DicomInputError (see the module docstring for the reasons); never another exception for
    bad content. A missing file still raises FileNotFoundError (that is the caller's bug, not the data's).
    """
    ds = read_dataset(source)
    fmt, frames, notes = check_image(ds)
    tsyntax = transfer_syntax_of(ds)
    if tsyntax in NATIVE_SYNTAXES:
        _check_native_length(ds, fmt, frames)
    try:
        decoded = decode_first_frame(ds, tsyntax)
    except DicomInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder internals must not escape to a listener
        raise DicomInputError("decode_failed", f"cannot decode pixel data ({tsyntax}): {exc}") from exc
    if decoded.pixels.ndim != 2:
        raise DicomInputError("decode_failed", f"decoded frame has shape {decoded.pixels.shape}, expected 2-D")
    try:
        pixels, voi, render_notes = render_display(decoded.pixels, ds, fmt)
    except DicomInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a malformed LUT Descriptor
        raise DicomInputError("bad_lut", f"cannot apply modality/VOI LUT: {exc}") from exc
    if frames > 1:
        notes.append(f"multi-frame: first of {frames} frames used")
    return DisplayImage(
        pixels=pixels, source="dicom", transfer_syntax=str(tsyntax),
        frame=0 if "NumberOfFrames" in ds else None,  # None: a single-frame IOD has no frame to name
        number_of_frames=frames, notes=[*notes, *decoded.notes, *render_notes], decoder=decoded.plugin or "native",
        voi=voi,
    )
