"""Inputs that cannot be a chest radiograph each give DicomInputError with their own specific reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testkit.env import require_tool
from testkit.dicom_factory import encode_with_tool, make_dataset, make_file, make_rgb_dataset, synthetic_radiograph, write_dicom
from pydicom.dataset import Dataset

from dicom_io import DicomInputError, load_display_image, read_dicom_display
from dicom_io.dicom import MAX_SIDE

PIXELS = synthetic_radiograph(64, 48, 12)


def reason_of(source: str | Path | Dataset) -> str:
    with pytest.raises(DicomInputError) as caught:
        read_dicom_display(source)
    assert caught.value.message and caught.value.reason in str(caught.value)
    return caught.value.reason


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    del ds.PixelData
    ds.Modality = "SR"
    assert reason_of(write_dicom(ds, tmp_path / "sr.dcm")) == "no_pixel_data"


def test_not_dicom_at_all(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("this is a clinical note, not an image\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert reason_of(text) == "not_dicom"
    assert reason_of(empty) == "not_dicom"


def test_jpeg_named_dcm_is_not_dicom(tmp_path: Path) -> None:
    import cv2
    path = tmp_path / "photo.dcm"
    path.write_bytes(cv2.imencode(".jpg", (PIXELS >> 4).astype(np.uint8))[1].tobytes())
    assert reason_of(path) == "not_dicom"


def test_truncated_native_file(tmp_path: Path) -> None:
    """An interrupted transfer: the header is intact, the Pixel Data stops half way."""
    path = make_file(tmp_path / "whole.dcm", PIXELS, bits_stored=12, window=(2000, 3000))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - PIXELS.nbytes // 2])
    assert reason_of(cut) == "truncated_pixel_data"


def test_truncated_compressed_file(tmp_path: Path) -> None:
    require_tool("dcmcrle")
    native = make_file(tmp_path / "whole.dcm", PIXELS, bits_stored=12)
    rle = encode_with_tool("dcmtk-rle", native, tmp_path / "rle.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(rle.read_bytes()[: rle.stat().st_size * 2 // 3])
    assert reason_of(cut) == "truncated_file"


def test_truncated_inside_header(tmp_path: Path) -> None:
    path = make_file(tmp_path / "whole.dcm", PIXELS, bits_stored=12)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:300])  # past the file meta, inside the data set
    assert reason_of(cut) == "truncated_file"


def test_pixel_data_shorter_than_declared() -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    ds.Rows = 65  # one row more than the Pixel Data holds
    assert reason_of(ds) == "truncated_pixel_data"
    frames = make_dataset(np.stack([PIXELS, PIXELS]), bits_stored=12)
    frames.NumberOfFrames = 3
    assert reason_of(frames) == "truncated_pixel_data"


def test_rgb_is_refused(tmp_path: Path) -> None:
    assert reason_of(write_dicom(make_rgb_dataset(), tmp_path / "rgb.dcm")) == "unsupported_photometric"


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "YBR_FULL_422", "HSV"])
def test_other_photometrics_are_refused(photometric: str) -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    ds.PhotometricInterpretation = photometric
    assert reason_of(ds) == "unsupported_photometric"


def test_zero_rows(tmp_path: Path) -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    ds.Rows = 0
    assert reason_of(write_dicom(ds, tmp_path / "zero.dcm")) == "bad_dimensions"


@pytest.mark.parametrize("rows, cols", [(MAX_SIDE + 1, 48), (64, 60000), (None, 48)])
def test_absurd_or_missing_dimensions(rows: int | None, cols: int) -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    if rows is None:
        del ds.Rows
    else:
        ds.Rows = rows
    ds.Columns = cols
    assert reason_of(ds) == "bad_dimensions"


def test_unsupported_bit_depth() -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    ds.BitsStored = 17
    assert reason_of(ds) == "unsupported_pixel_format"


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = make_dataset(PIXELS, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not a radiograph codec
    assert reason_of(ds) == "unsupported_transfer_syntax"


def test_corrupt_compressed_data_is_decode_failed(tmp_path: Path) -> None:
    require_tool("dcmcjpls")
    native = make_file(tmp_path / "whole.dcm", PIXELS, bits_stored=12)
    encoded = encode_with_tool("dcmtk-jpeg-ls-lossless", native, tmp_path / "jls.dcm")
    data = bytearray(encoded.read_bytes())
    start = data.rfind(b"\xff\xd8")  # JPEG-LS SOI of the frame
    data[start: start + 64] = b"\x00" * 64  # wipe SOI and the frame header
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(data))
    assert reason_of(broken) == "decode_failed"


def test_short_lut_data_is_bad_lut() -> None:
    ds = make_dataset(PIXELS, bits_stored=12, voi_lut=(0, 16, np.arange(100)))
    ds.VOILUTSequence[0].LUTDescriptor = [4096, 0, 16]  # declares more entries than it has
    assert reason_of(ds) == "bad_lut"


def test_load_display_image_routes_non_images_to_dicom(tmp_path: Path) -> None:
    """No JPEG/PNG suffix -> read as DICOM, so the DICOM reasons come back."""
    junk = tmp_path / "file.bin"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(DicomInputError) as caught:
        load_display_image(junk)
    assert caught.value.reason == "not_dicom"


def _with_raw_rescale(path: Path, slope: bytes, intercept: bytes = b"0") -> Path:
    """A file whose Rescale Slope/Intercept hold exactly these DS bytes (pydicom would not write NaN)."""
    make_file(path, PIXELS, bits_stored=12, rescale=(1, 0))
    data = path.read_bytes()
    for tag, value in ((b"\x28\x00\x53\x10DS", slope), (b"\x28\x00\x52\x10DS", intercept)):
        value += b" " * (len(value) % 2)
        at = data.index(tag)
        old_length = int.from_bytes(data[at + 6: at + 8], "little")
        data = data[:at] + tag + len(value).to_bytes(2, "little") + value + data[at + 8 + old_length:]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("slope, intercept", [(b"0", b"0"), (b"0.0", b"-1024"), (b"NaN", b"0"), (b"inf", b"0"),
                                              (b"-Infinity", b"0"), (b"1", b"NaN"), (b"1", b"inf"), (b"1e400", b"0"),
                                              (b"abc", b"0"), (b"1\\2", b"0")])
def test_unusable_rescale_is_bad_rescale(tmp_path: Path, slope: bytes, intercept: bytes) -> None:
    """Slope 0 would flatten the image (PS3.3 C.11.1.1.2), NaN/inf are no DS: refused, never read as slope 1."""
    assert reason_of(_with_raw_rescale(tmp_path / "bad.dcm", slope, intercept)) == "bad_rescale"


def test_rescale_is_checked_before_decoding(tmp_path: Path) -> None:
    """The header alone decides: the same file with its pixel data cut short is still bad_rescale."""
    path = _with_raw_rescale(tmp_path / "bad.dcm", b"0")
    path.write_bytes(path.read_bytes()[:-100])
    assert reason_of(path) == "bad_rescale"


def test_modality_lut_sequence_replaces_an_unusable_rescale() -> None:
    """C.11.1: with a Modality LUT Sequence the rescale is not used, so slope 0 beside it is no error."""
    ds = make_dataset(PIXELS, bits_stored=12, modality_lut=(0, 16, np.arange(4096)[::-1]))
    ds.RescaleSlope, ds.RescaleIntercept = 0, 0
    assert read_dicom_display(ds).pixels.std() > 0


def test_a_usable_rescale_is_applied_unchanged(tmp_path: Path) -> None:
    """Slope 2, intercept 10 with the window scaled to match (LINEAR_EXACT, exact in binary) gives the very image of
    the unscaled file; slope 1, intercept 0 spelled out equals no rescale at all; empty values are absent ones."""
    plain = read_dicom_display(make_dataset(PIXELS, bits_stored=12, window=(2000, 3000),
                                            voi_lut_function="LINEAR_EXACT")).pixels
    scaled = read_dicom_display(make_dataset(PIXELS, bits_stored=12, rescale=(2, 10), window=(4010, 6000),
                                             voi_lut_function="LINEAR_EXACT")).pixels
    assert plain.std() > 0 and np.array_equal(plain, scaled)
    unit = read_dicom_display(make_dataset(PIXELS, bits_stored=12, rescale=(1, 0), window=(2000, 3000),
                                           voi_lut_function="LINEAR_EXACT")).pixels
    assert np.array_equal(plain, unit)
    empty = read_dicom_display(_with_raw_rescale(tmp_path / "empty.dcm", b"", b"")).pixels
    assert np.array_equal(empty, read_dicom_display(make_dataset(PIXELS, bits_stored=12)).pixels)
