"""Build synthetic DICOM radiographs (CR/DX-like) with pydicom, for tests and benchmarks.

Everything the pixel path cares about can be dialled in: bit depth, signedness, MONOCHROME1/2,
rescale, windows (and the VOI LUT Function), a VOI LUT Sequence, a Modality LUT Sequence, Pixel
Padding Value, multiple frames, RGB. Files are written as Explicit VR Little Endian; other transfer
syntaxes are made by independent encoders (DCMTK, GDCM) in the tests, see ``encode_with_tool``.

Import it from a test as ``from testkit.dicom_factory import make_dataset``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
MULTIFRAME_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

LUTSpec = tuple[int, int, Sequence[int]]
"""(first input value mapped, bits per entry, entries) as in LUT Descriptor + LUT Data."""


def synthetic_radiograph(rows: int = 256, cols: int = 200, bits_stored: int = 12, *, signed: bool = False,
                         seed: int = 0) -> np.ndarray:
    """A smooth chest-like image (two dark 'lungs', bright body, mild noise) spanning most of the range.

    Smooth structure plus noise compresses like a real radiograph (neither trivially nor not at all),
    so encoder/decoder timings on it are realistic.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y /= max(rows - 1, 1)
    x /= max(cols - 1, 1)
    body = 0.85 - 0.5 * ((x - 0.5) ** 2 + 0.3 * (y - 0.5) ** 2)
    lungs = sum(np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.48) / 0.28) ** 2)) for cx in (0.3, 0.7))
    image = np.clip(body - 0.55 * lungs + rng.normal(0, 0.01, (rows, cols)), 0.0, 1.0)
    top = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    bottom = -(1 << (bits_stored - 1)) if signed else 0
    values = np.round(bottom + image * (top - bottom))
    return values.astype(np.int16 if signed and bits_stored <= 16 else np.uint16 if bits_stored <= 16 else np.uint32)


def _lut_item(spec: LUTSpec, *, signed_first: bool = False) -> Dataset:
    first, bits, entries = spec
    item = Dataset()
    count = len(entries)
    # LUT Descriptor is US, or SS when the mapped input is signed (PS3.3 C.11.1.1.1 / C.11.2.1.1)
    item.add_new(0x00283002, "SS" if signed_first else "US", [count if count < 65536 else 0, first, bits])
    item.add_new(0x00283006, "OW", np.asarray(entries, dtype="<u2").tobytes())  # LUT Data, as OW like most modalities
    return item


def make_dataset(pixels: np.ndarray, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                 sop_class: str = DX_FOR_PRESENTATION_STORAGE, rescale: tuple[float, float] | None = None,
                 window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
                 voi_lut_function: str | None = None, voi_lut: LUTSpec | None = None,
                 modality_lut: LUTSpec | None = None, padding_value: int | None = None,
                 padding_range_limit: int | None = None) -> Dataset:
    """A complete file dataset around ``pixels`` (rows x cols, frames x rows x cols, or rows x cols x 3).

    Bits Allocated follows the dtype (uint8/int8 -> 8, (u)int16 -> 16); Pixel Representation is 1
    for signed dtypes. ``window`` may be one (center, width) pair or several.
    """
    pixels = np.ascontiguousarray(pixels)
    is_rgb = photometric in ("RGB", "YBR_FULL")
    frames = pixels.shape[0] if (pixels.ndim == 3 and not is_rgb) or pixels.ndim == 4 else 1
    rows, cols = pixels.shape[-3:-1] if is_rgb else pixels.shape[-2:]
    bits_allocated = pixels.dtype.itemsize * 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SYNTH"
    ds.PatientName = "Synthetic^Chest"
    ds.Modality = "CR" if sop_class == CR_IMAGE_STORAGE else "DX"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 3 if is_rgb else 1
    if is_rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (float(v) for v in rescale)
        ds.RescaleType = "US"
    if window is not None:
        pairs = [window] if isinstance(window[0], (int, float)) else list(window)
        ds.WindowCenter = [float(c) for c, _ in pairs] if len(pairs) > 1 else float(pairs[0][0])
        ds.WindowWidth = [float(w) for _, w in pairs] if len(pairs) > 1 else float(pairs[0][1])
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        ds.VOILUTSequence = DicomSequence([_lut_item(voi_lut, signed_first=bool(ds.PixelRepresentation))])
    if modality_lut is not None:
        item = _lut_item(modality_lut, signed_first=bool(ds.PixelRepresentation))
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = DicomSequence([item])
    if padding_value is not None:
        ds.PixelPaddingValue = int(padding_value)
    if padding_range_limit is not None:
        ds.PixelPaddingRangeLimit = int(padding_range_limit)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def write_dicom(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM file (preamble + meta) and return the path."""
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_file(path: str | Path, pixels: np.ndarray, **kwargs) -> Path:
    """``make_dataset`` + ``write_dicom`` in one step."""
    return write_dicom(make_dataset(pixels, **kwargs), path)


def make_rgb_dataset(rows: int = 64, cols: int = 48) -> Dataset:
    """A plain 8-bit RGB secondary capture (a screenshot of a radiograph, say)."""
    grey = (synthetic_radiograph(rows, cols, 8) & 0xFF).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    return make_dataset(rgb, photometric="RGB", sop_class=SECONDARY_CAPTURE_STORAGE)


TOOL_COMMANDS: dict[str, list[str]] = {
    # DCMTK
    "dcmtk-jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],        # 1.2.840.10008.1.2.4.70
    "dcmtk-jpeg-lossless": ["dcmcjpeg", "+el"],            # 1.2.840.10008.1.2.4.57
    "dcmtk-jpeg-baseline": ["dcmcjpeg", "+eb"],            # 1.2.840.10008.1.2.4.50 (8-bit only)
    "dcmtk-jpeg-extended": ["dcmcjpeg", "+ee"],            # 1.2.840.10008.1.2.4.51
    "dcmtk-jpeg-ls-lossless": ["dcmcjpls", "+el"],         # 1.2.840.10008.1.2.4.80
    "dcmtk-jpeg-ls-near": ["dcmcjpls", "+en", "+md", "2"],  # 1.2.840.10008.1.2.4.81
    "dcmtk-rle": ["dcmcrle"],                              # 1.2.840.10008.1.2.5
    "dcmtk-implicit": ["dcmconv", "+ti"],                  # 1.2.840.10008.1.2
    "dcmtk-big-endian": ["dcmconv", "+tb"],                # 1.2.840.10008.1.2.2
    "dcmtk-deflated": ["dcmconv", "+td"],                  # 1.2.840.10008.1.2.1.99
    # GDCM
    "gdcm-j2k-lossless": ["gdcmconv", "--j2k"],            # 1.2.840.10008.1.2.4.90
    "gdcm-j2k-lossy": ["gdcmconv", "--j2k", "--lossy", "-r", "10"],  # 1.2.840.10008.1.2.4.91, ratio 10
    "gdcm-jpeg-lossless": ["gdcmconv", "--jpeg"],          # 1.2.840.10008.1.2.4.70
    "gdcm-jpeg-ls": ["gdcmconv", "--jpegls"],              # 1.2.840.10008.1.2.4.80
    "gdcm-rle": ["gdcmconv", "--rle"],                     # 1.2.840.10008.1.2.5
}
"""Independent encoders: name -> command prefix (input and output paths are appended)."""


def encode_with_tool(kind: str, src: str | Path, dst: str | Path) -> Path:
    """Re-encode ``src`` into ``dst`` with DCMTK or GDCM (see TOOL_COMMANDS); raises on failure."""
    command = [*TOOL_COMMANDS[kind], str(src), str(dst)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not Path(dst).is_file():
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return Path(dst)


# --- an 8-bit grey picture as a 12-bit DICOM whose first window shows it again (parity tests) ---

LEVELS_PER_GREY = 16
"""12-bit stored value = 16 * grey + offset: the window below maps it back onto the 8-bit grey."""
OFFSET = LEVELS_PER_GREY // 2
# LINEAR (C.11.2.1.2): y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255; with w - 1 = 16 * 255 and
# c - 0.5 = 16 * 127.5 + OFFSET, x = 16 g + OFFSET gives exactly y = g.
LINEAR_WINDOW = (LEVELS_PER_GREY * 127.5 + OFFSET + 0.5, LEVELS_PER_GREY * 255 + 1)
# LINEAR_EXACT: y = ((x - c) / w + 0.5) * 255; w = 16 * 255, c = 16 * 127.5 + OFFSET.
EXACT_WINDOW = (LEVELS_PER_GREY * 127.5 + OFFSET, LEVELS_PER_GREY * 255)


def wrap_grey_as_dicom(grey: np.ndarray, path: Path, *, monochrome1: bool, function: str = "LINEAR",
                  intercept: int = 0, dither: np.ndarray | None = None, bits_stored: int = 12) -> Path:
    """A DICOM whose first window shows ``grey`` again (a rescale intercept shifts the stored values only)."""
    shown = 255 - grey.astype(np.int32) if monochrome1 else grey.astype(np.int32)
    stored = shown * LEVELS_PER_GREY + OFFSET - intercept
    if dither is not None:
        stored = stored + dither
    center, width = LINEAR_WINDOW if function == "LINEAR" else EXACT_WINDOW
    assert stored.min() >= 0 and stored.max() < 1 << bits_stored
    return make_file(path, stored.astype(np.uint16), bits_stored=bits_stored,
                     photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                     rescale=(1, intercept) if intercept else None, window=(center, width),
                     voi_lut_function=function)
