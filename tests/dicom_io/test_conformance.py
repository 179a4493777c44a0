"""dicom_io against independent implementations: DCMTK renders, DCMTK/GDCM encoders, pydicom-data files.

* Display (C.11 modality LUT -> VOI -> MONOCHROME1 inversion): DCMTK's dcmj2pnm renders the same
  file to 8 bits; ours must agree within 1 grey level (DCMTK truncates where we round).
* Decoding: every transfer syntax, encoded by DCMTK or GDCM (not by the library that decodes it),
  must give exactly the stored values of the uncompressed original for lossless syntaxes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from testkit.env import require_tool
from testkit.dicom_factory import TOOL_COMMANDS, encode_with_tool, make_dataset, make_file, synthetic_radiograph, write_dicom
from pydicom.data import get_testdata_file

from dicom_io import read_dicom_display
from dicom_io.decode import IMAGECODECS_SYNTAXES, _imagecodecs_frame, decode_first_frame, transfer_syntax_of
from pydicom.pixels import get_decoder

ROWS, COLS = 300, 240


def dcmtk_render(path: Path, *voi_options: str) -> np.ndarray:
    """dcmj2pnm's 8-bit PGM of ``path`` with the given VOI options (modality LUT on by default)."""
    require_tool("dcmj2pnm")
    out = path.with_suffix(".pgm")
    subprocess.run(["dcmj2pnm", "-q", *voi_options, "+op", str(path), str(out)], check=True, capture_output=True)
    rendered = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert rendered is not None and rendered.dtype == np.uint8
    return rendered


def assert_within_one(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert difference.max() <= 1, f"max difference {difference.max()} grey levels"
    assert np.unique(ours).size > 50, "degenerate rendering: the comparison would prove nothing"


U12 = synthetic_radiograph(ROWS, COLS, 12)
S12 = synthetic_radiograph(ROWS, COLS, 12, signed=True)
S16 = synthetic_radiograph(ROWS, COLS, 16, signed=True)
U8 = synthetic_radiograph(ROWS, COLS, 8).astype(np.uint8)
U16 = synthetic_radiograph(ROWS, COLS, 16)
SQRT_VOI_LUT = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(int)

DISPLAY_CASES = {
    # name: (pixels, make_dataset options, dcmj2pnm VOI options)
    "mono2-12bit-window": (U12, dict(bits_stored=12, window=(2000, 3000)), ["+Wi", "1"]),
    "mono1-12bit-window": (U12, dict(bits_stored=12, window=(2000, 3000), photometric="MONOCHROME1"), ["+Wi", "1"]),
    "mono2-narrow-window": (U12, dict(bits_stored=12, window=(2000.5, 301)), ["+Wi", "1"]),
    "first-of-two-windows": (U12, dict(bits_stored=12, window=[(1500, 1000), (3000, 500)]), ["+Wi", "1"]),
    "sigmoid": (U12, dict(bits_stored=12, window=(2000, 3000), voi_lut_function="SIGMOID"), ["+Wi", "1"]),
    "mono1-sigmoid": (U12, dict(bits_stored=12, window=(2000, 1500), voi_lut_function="SIGMOID",
                                photometric="MONOCHROME1"), ["+Wi", "1"]),
    "linear-exact": (U12, dict(bits_stored=12, window=(2000, 3000), voi_lut_function="LINEAR_EXACT"), ["+Wi", "1"]),
    "unsigned-16bit": (U16, dict(window=(30000, 50000)), ["+Wi", "1"]),
    "signed-16bit-rescale": (S16, dict(rescale=(2, -1024), window=(0, 60000)), ["+Wi", "1"]),
    "signed-12bit-rescale-mono1": (S12, dict(bits_stored=12, rescale=(0.5, 100), window=(100, 1500),
                                             photometric="MONOCHROME1"), ["+Wi", "1"]),
    "unsigned-8bit": (U8, dict(window=(128, 100)), ["+Wi", "1"]),
    "voi-lut-sequence": (U12, dict(bits_stored=12, voi_lut=(0, 16, SQRT_VOI_LUT)), ["+Wl", "1"]),
    "voi-lut-partial-mono1": (U12, dict(bits_stored=12, voi_lut=(1000, 12, np.arange(2000) * 2),
                                        photometric="MONOCHROME1"), ["+Wl", "1"]),
    "voi-lut-signed-first": (S12, dict(bits_stored=12, voi_lut=(-1000, 16, np.arange(2000) * 32)), ["+Wl", "1"]),
    "modality-lut-sequence": (U12, dict(bits_stored=12, modality_lut=(0, 12, 4095 - np.arange(4096)),
                                        window=(2000, 3000)), ["+Wi", "1"]),
    "modality-lut-signed": (S12, dict(bits_stored=12, modality_lut=(-2048, 12, np.arange(4096)),
                                      window=(2000, 3000)), ["+Wi", "1"]),
    "unsigned-32bit-direct-path": (synthetic_radiograph(ROWS, COLS, 20).astype(np.uint32),
                                   dict(bits_stored=20, rescale=(1, -1000), window=(500000, 800000)), ["+Wi", "1"]),
    "explicit-window-option": (U12, dict(bits_stored=12, window=(1800, 2500)), ["+Ww", "1800", "2500"]),
}


@pytest.mark.dcmtk
@pytest.mark.parametrize("case", sorted(DISPLAY_CASES))
def test_display_matches_dcmtk(case: str, tmp_path: Path) -> None:
    pixels, options, voi_options = DISPLAY_CASES[case]
    path = make_file(tmp_path / f"{case}.dcm", pixels, **options)
    assert_within_one(read_dicom_display(path).pixels, dcmtk_render(path, *voi_options))


@pytest.mark.dcmtk
def test_monochrome1_is_inverted_after_voi(tmp_path: Path) -> None:
    """Same stored values and window, MONOCHROME1 vs 2: exact complements, and DCMTK agrees on both."""
    mono2 = make_file(tmp_path / "m2.dcm", U12, bits_stored=12, window=(1000, 800))
    mono1 = make_file(tmp_path / "m1.dcm", U12, bits_stored=12, window=(1000, 800), photometric="MONOCHROME1")
    ours2, ours1 = read_dicom_display(mono2).pixels, read_dicom_display(mono1).pixels
    assert np.array_equal(ours1, 255 - ours2)
    assert_within_one(ours1, dcmtk_render(mono1, "+Wi", "1"))


@pytest.mark.dcmtk
@pytest.mark.parametrize("photometric, shape, inverted", [
    ("MONOCHROME1", "INVERSE", True), ("MONOCHROME2", "INVERSE", True), ("MONOCHROME1", "IDENTITY", False),
    ("MONOCHROME2", "IDENTITY", False),
])
def test_presentation_lut_shape_decides_polarity(photometric: str, shape: str, inverted: bool, tmp_path: Path) -> None:
    """DX: MONOCHROME1 comes with INVERSE (one inversion, not two); a contradicting shape wins, as in DCMTK."""
    ds = make_dataset(U12, bits_stored=12, window=(2000, 3000), photometric=photometric)
    ds.PresentationLUTShape = shape
    path = write_dicom(ds, tmp_path / "shape.dcm")
    plain = read_dicom_display(make_dataset(U12, bits_stored=12, window=(2000, 3000))).pixels
    ours = read_dicom_display(path).pixels
    assert np.array_equal(ours, 255 - plain if inverted else plain)
    assert_within_one(ours, dcmtk_render(path, "+Wi", "1"))


def test_window_on_big_endian_and_ow_lut_bytes(tmp_path: Path) -> None:
    """A VOI LUT stored as OW in a Big Endian file must be byte-swapped like the pixels."""
    require_tool("dcmconv")
    little = make_file(tmp_path / "le.dcm", U12, bits_stored=12, voi_lut=(0, 16, SQRT_VOI_LUT))
    big = encode_with_tool("dcmtk-big-endian", little, tmp_path / "be.dcm")
    assert pydicom.dcmread(big).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    assert np.array_equal(read_dicom_display(big).pixels, read_dicom_display(little).pixels)


def test_auto_window_percentiles_ignore_padding(tmp_path: Path) -> None:
    """No VOI at all: 0.5/99.5 percentiles of the non-padding pixels (checked with np.percentile)."""
    pixels = U12.copy()
    pixels[:, :40] = 0  # a collimated border flagged as padding
    pixels[0, 50] = 4095  # one hot pixel: the percentiles must ignore it
    path = make_file(tmp_path / "auto.dcm", pixels, bits_stored=12, padding_value=0)
    image = read_dicom_display(path)
    body = pixels[pixels != 0].astype(np.float64)
    low, high = np.percentile(body, [0.5, 99.5], method="inverted_cdf")
    expected = np.rint(np.clip((pixels - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    assert image.voi.startswith("auto") and any("automatic window" in note for note in image.notes)
    assert np.abs(image.pixels.astype(int) - expected).max() <= 1
    unpadded = read_dicom_display(make_file(tmp_path / "nopad.dcm", pixels, bits_stored=12))
    assert not np.array_equal(unpadded.pixels, image.pixels), "padding must change the automatic window"


@pytest.mark.parametrize("center, width", [(2000, 0), (2000, -5), ("abc", 300)])
def test_unusable_window_falls_back_to_auto_window(center, width) -> None:
    ds = make_dataset(U12, bits_stored=12)
    ds.add_new(0x00281050, "DS", None)
    ds.add_new(0x00281051, "DS", None)
    ds["WindowCenter"]._value, ds["WindowWidth"]._value = center, width  # bypass pydicom's DS validation
    image = read_dicom_display(ds)
    assert image.voi.startswith("auto") and len(image.notes) == 2
    assert np.array_equal(image.pixels, read_dicom_display(make_dataset(U12, bits_stored=12)).pixels)


def test_padding_range_limit_and_signed_padding(tmp_path: Path) -> None:
    pixels = S12.copy()
    pixels[:20] = -2048
    pixels[20:30] = -2000
    ds = make_dataset(pixels, bits_stored=12, padding_value=-2048, padding_range_limit=-2000)
    body = pixels[(pixels < -2048) | (pixels > -2000)].astype(np.float64)
    low, high = np.percentile(body, [0.5, 99.5], method="inverted_cdf")
    image = read_dicom_display(ds)
    assert f"auto {low:g}..{high:g}" == image.voi


# ---- the real CR chest radiograph (MONOCHROME1, 15 bits, 1955 x 1841) and its re-encodings ---------------

RG1 = "RG1_UNCR.dcm"


@pytest.fixture(scope="module")
def rg1_reference() -> tuple[Path, np.ndarray, np.ndarray]:
    """(path, stored values, our display image) of the uncompressed original."""
    path = Path(get_testdata_file(RG1))
    ds = pydicom.dcmread(path)
    return path, decode_first_frame(ds, transfer_syntax_of(ds)).pixels, read_dicom_display(path).pixels


@pytest.mark.dcmtk
def test_rg1_display_matches_dcmtk(rg1_reference, tmp_path: Path) -> None:
    path, _stored, ours = rg1_reference
    image = read_dicom_display(path)
    assert image.voi == "window 15000/30000 LINEAR" and image.decoder == "native"
    local = tmp_path / RG1
    local.write_bytes(path.read_bytes())
    assert_within_one(ours, dcmtk_render(local, "+Wi", "1"))


def test_rg1_jpeg2000_lossless_equals_uncompressed(rg1_reference) -> None:
    _path, _stored, ours = rg1_reference
    image = read_dicom_display(get_testdata_file("RG1_J2KR.dcm"))
    assert image.transfer_syntax == pydicom.uid.JPEG2000Lossless
    assert np.array_equal(image.pixels, ours)


def test_rg1_jpeg2000_lossy_is_close(rg1_reference) -> None:
    _path, _stored, ours = rg1_reference
    image = read_dicom_display(get_testdata_file("RG1_J2KI.dcm"))
    difference = np.abs(image.pixels.astype(np.int16) - ours)
    assert image.transfer_syntax == pydicom.uid.JPEG2000
    assert difference.mean() < 0.5 and difference.max() <= 8


LOSSLESS_ENCODINGS = [
    "dcmtk-jpeg-lossless-sv1", "dcmtk-jpeg-lossless", "dcmtk-jpeg-ls-lossless", "dcmtk-rle",
    "dcmtk-implicit", "dcmtk-big-endian", "dcmtk-deflated",
    "gdcm-j2k-lossless", "gdcm-jpeg-lossless", "gdcm-jpeg-ls", "gdcm-rle",
]
EXPECTED_SYNTAX = {
    "dcmtk-jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70", "dcmtk-jpeg-lossless": "1.2.840.10008.1.2.4.57",
    "dcmtk-jpeg-ls-lossless": "1.2.840.10008.1.2.4.80", "dcmtk-rle": "1.2.840.10008.1.2.5",
    "dcmtk-implicit": "1.2.840.10008.1.2", "dcmtk-big-endian": "1.2.840.10008.1.2.2",
    "dcmtk-deflated": "1.2.840.10008.1.2.1.99", "gdcm-j2k-lossless": "1.2.840.10008.1.2.4.90",
    "gdcm-jpeg-lossless": "1.2.840.10008.1.2.4.70", "gdcm-jpeg-ls": "1.2.840.10008.1.2.4.80",
    "gdcm-rle": "1.2.840.10008.1.2.5",
}


@pytest.mark.parametrize("kind", LOSSLESS_ENCODINGS)
def test_rg1_lossless_reencodings_decode_exactly(kind: str, rg1_reference, tmp_path: Path) -> None:
    path, stored, ours = rg1_reference
    require_tool(TOOL_COMMANDS[kind][0])
    encoded = encode_with_tool(kind, path, tmp_path / f"{kind}.dcm")
    image = read_dicom_display(encoded)
    assert image.transfer_syntax == EXPECTED_SYNTAX[kind]
    ds = pydicom.dcmread(encoded)
    assert np.array_equal(decode_first_frame(ds, transfer_syntax_of(ds)).pixels, stored)
    assert np.array_equal(image.pixels, ours)
    if image.transfer_syntax in IMAGECODECS_SYNTAXES:  # the fast decoder, not a silent fallback
        assert image.decoder == "imagecodecs" and not any("fallback" in n for n in image.notes)


def test_jpeg_lossless_fast_decoder_agrees_with_every_plugin(rg1_reference, tmp_path: Path) -> None:
    """imagecodecs (libjpeg-turbo) and the pydicom plugins give the same stored values, SV1 and Process 14."""
    path, stored, _ours = rg1_reference
    require_tool("dcmcjpeg")
    for kind in ("dcmtk-jpeg-lossless-sv1", "dcmtk-jpeg-lossless"):
        ds = pydicom.dcmread(encode_with_tool(kind, path, tmp_path / f"{kind}.dcm"))
        tsyntax = transfer_syntax_of(ds)
        plugins = [p for p in get_decoder(tsyntax).available_plugins]
        assert plugins, "no pydicom plugin to compare with"
        for plugin in plugins:
            theirs, _ = get_decoder(tsyntax).as_array(ds, index=0, raw=True, decoding_plugin=plugin)
            assert np.array_equal(theirs, stored), plugin
        assert np.array_equal(_imagecodecs_frame(ds), stored)


def test_signed_jpeg_lossless_is_left_to_pydicom(tmp_path: Path) -> None:
    """Signed stored values: the fast path steps aside (pydicom converts two's complement), same pixels."""
    require_tool("dcmcjpeg")
    signed = (U12.astype(np.int32) - 2048).astype(np.int16)
    native = make_file(tmp_path / "signed.dcm", signed, bits_stored=12, window=(0, 4096))
    encoded = encode_with_tool("dcmtk-jpeg-lossless-sv1", native, tmp_path / "signed_ll.dcm")
    ds = pydicom.dcmread(encoded)
    with pytest.raises(ValueError, match="signed"):
        _imagecodecs_frame(ds)
    decoded = decode_first_frame(ds, transfer_syntax_of(ds))
    assert decoded.plugin != "imagecodecs" and np.array_equal(decoded.pixels, signed)


def test_jpeg_lossy_decodes_like_dcmtk(tmp_path: Path) -> None:
    """Baseline (8-bit) and Extended (12-bit) JPEG: our pixels vs DCMTK's own decoder (dcmdjpeg), +-1."""
    require_tool("dcmcjpeg", "dcmdjpeg")
    for name, pixels, kind, bits in [("base", U8, "dcmtk-jpeg-baseline", 8), ("ext", U12, "dcmtk-jpeg-extended", 12)]:
        original = make_file(tmp_path / f"{name}.dcm", pixels, bits_stored=bits, window=(2 ** (bits - 1), 2 ** bits))
        encoded = encode_with_tool(kind, original, tmp_path / f"{name}_jpeg.dcm")
        decoded_by_dcmtk = tmp_path / f"{name}_dcmtk.dcm"
        subprocess.run(["dcmdjpeg", str(encoded), str(decoded_by_dcmtk)], check=True, capture_output=True)
        ds = pydicom.dcmread(encoded)
        ours = decode_first_frame(ds, transfer_syntax_of(ds)).pixels.astype(np.int32)
        reference = pydicom.dcmread(decoded_by_dcmtk).pixel_array.astype(np.int32)
        assert np.abs(ours - reference).max() <= 1, name
        # dcmcjpeg may rescale the stored values (and shift the window to match): compare what is displayed
        shown = read_dicom_display(encoded).pixels.astype(np.int16)
        assert np.abs(shown - read_dicom_display(original).pixels).mean() < 2, f"{name}: lossy beyond reason"


def test_native_fast_view_equals_pydicom(tmp_path: Path) -> None:
    """The no-copy view of little-endian unsigned data gives pydicom's stored values for 8 and 16
    bits, one and several frames; bits above High Bit stay as sent (pydicom clears them, the
    render's table ignores them: the displayed image is the same)."""
    garbage = U12 | np.uint16(0xA000)  # set bits above High Bit 11
    cases = {"u12": (U12, 12), "garbage": (garbage, 12), "u8": (U8, 8), "frames": (np.stack([U12, 4095 - U12]), 12)}
    for name, (pixels, bits) in cases.items():
        ds = pydicom.dcmread(make_file(tmp_path / f"{name}.dcm", pixels, bits_stored=bits))
        fast = decode_first_frame(ds, transfer_syntax_of(ds)).pixels
        reference, _ = get_decoder(transfer_syntax_of(ds)).as_array(ds, index=0, raw=True)
        assert not fast.flags.owndata, name  # a view, not pydicom's copy
        mask = (1 << bits) - 1
        assert fast.dtype == reference.dtype and np.array_equal(fast & mask, reference), name
    shown = read_dicom_display(make_file(tmp_path / "g.dcm", garbage, bits_stored=12, window=(2000, 3000))).pixels
    assert np.array_equal(shown, read_dicom_display(make_file(tmp_path / "c.dcm", U12, bits_stored=12,
                                                              window=(2000, 3000))).pixels)


# ---- multi-frame and network datasets ----------------------------------------------------------------------

def test_multiframe_uses_first_frame_only(tmp_path: Path) -> None:
    frames = np.stack([U12, 4095 - U12, U12 // 2])
    path = make_file(tmp_path / "mf.dcm", frames, bits_stored=12, window=(2000, 3000))
    single = read_dicom_display(make_file(tmp_path / "one.dcm", U12, bits_stored=12, window=(2000, 3000)))
    image = read_dicom_display(path)
    assert image.number_of_frames == 3 and image.frame == 0
    assert "multi-frame: first of 3 frames used" in image.notes
    assert np.array_equal(image.pixels, single.pixels)


def test_multiframe_rle_decodes_only_first_frame(tmp_path: Path) -> None:
    require_tool("dcmcrle")
    frames = np.stack([U12, 4095 - U12])
    native = make_file(tmp_path / "mf.dcm", frames, bits_stored=12, window=(2000, 3000))
    rle = encode_with_tool("dcmtk-rle", native, tmp_path / "mf_rle.dcm")
    image = read_dicom_display(rle)
    assert image.decoder == "pylibjpeg" and image.number_of_frames == 2
    assert np.array_equal(image.pixels, read_dicom_display(native).pixels)


def test_dataset_without_file_meta_from_network() -> None:
    """A C-STORE dataset may come without file meta: native Pixel Data is still readable."""
    ds = make_dataset(U12, bits_stored=12, window=(2000, 3000))
    expected = read_dicom_display(ds).pixels
    del ds.file_meta
    image = read_dicom_display(ds)
    assert np.array_equal(image.pixels, expected)
    assert not hasattr(ds, "file_meta"), "the caller's dataset must not be modified"


def test_written_and_reread_dataset_agree(tmp_path: Path) -> None:
    ds = make_dataset(S16, rescale=(1, -1024), window=(-500, 1500), photometric="MONOCHROME1")
    path = write_dicom(ds, tmp_path / "rt.dcm")
    assert np.array_equal(read_dicom_display(ds).pixels, read_dicom_display(path).pixels)
