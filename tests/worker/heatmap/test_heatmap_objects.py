"""The heatmap objects: the SEG and the RGB key image pass dciodvfy, highdicom reads the SEG back with the
map's values at the source's geometry, the picture carries its burned-in text and colour, the polygon
encloses the maximum."""

from __future__ import annotations

import copy
import io
import warnings
import subprocess
import sys
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from testkit.dicom_factory import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    MULTIFRAME_GRAYSCALE_WORD_SC,
    make_dataset,
    synthetic_radiograph,
)
from testkit.env import require_tool

from dicom_io import map_to_image
from trainer.model_info import ModelInfo, new_model_uid
from worker.heatmap.key_image import build_key_image, key_image_jpeg
from worker.heatmap.overlay import (
    BAND_HEIGHT, PICTURE_LONG_SIDE, WARNING_TEXT, blend, colour_table, colourise, key_picture, percent, write_png,
)
from worker.heatmap.region import MAX_POINTS, strongest_region
from worker.heatmap.segmentation import (
    encode_segmentation,
    SEGMENT_TYPE, HeatmapKind, build_segmentation, build_segmentation_reference, clear_segmentation_templates, encode,
    acquisition_equipment, heatmap_uids, map_levels, rle_lossless_frame, segmentation_template_info,
)
from worker.sr import pack_source, unpack_source

#: (SOP class, photometric, Frame of Reference, frames) of the sources the objects are built for.
SOURCES = {
    "cr-monochrome1-no-frame-of-reference": (CR_IMAGE_STORAGE, "MONOCHROME1", False, 1),
    "dx-monochrome2-no-frame-of-reference": (DX_FOR_PRESENTATION_STORAGE, "MONOCHROME2", False, 1),
    "dx-with-frame-of-reference": (DX_FOR_PRESENTATION_STORAGE, "MONOCHROME2", True, 1),
    "multi-frame-sc": (MULTIFRAME_GRAYSCALE_WORD_SC, "MONOCHROME2", False, 3),
}
ROWS, COLS = 300, 244


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    return ModelInfo(arch="resnet18", name="cxr-pneumonia-test", version="1.1.0", threshold=0.42, uid=new_model_uid())


def source_file(kind: str, *, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> bytes:
    """A whole source image file (pixels included) of the kind, as a modality would send it."""
    sop_class, photometric, frame_of_reference, frames = SOURCES[kind]
    pixels = synthetic_radiograph(rows, cols, 12, seed=seed)
    if frames > 1:
        pixels = np.stack([pixels] * frames)
    ds = make_dataset(pixels, bits_stored=12, photometric=photometric, sop_class=sop_class)
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240305", "101500", "7", "ACC7"
    ds.PatientSex, ds.PatientBirthDate, ds.ReferringPhysicianName = "F", "19800101", "Ref^A"
    ds.Manufacturer, ds.PatientOrientation, ds.ImagerPixelSpacing = "ACME", ["R", "F"], [0.139, 0.139]
    ds.SpecificCharacterSet = "ISO_IR 100"
    if sop_class == MULTIFRAME_GRAYSCALE_WORD_SC:
        ds.Modality, ds.ConversionType = "OT", "WSD"
    if frame_of_reference:
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def kept_header(data: bytes) -> pydicom.Dataset:
    """The header the scorer has: the receive-time kept attributes (SOURCE_TAGS), no pixel data."""
    return unpack_source(pack_source(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)))


def cam_relevance(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A relevance map as the scorer makes it: a 7 x 7 map in [0, 1] (its own max 1) mapped back."""
    cells = np.random.default_rng(seed).random((7, 7)).astype(np.float32) ** 3
    cells /= cells.max()
    return np.clip(map_to_image(cells, rows, cols), 0.0, 1.0)


def dciodvfy(path: Path) -> list[str]:
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


def build_both(kind: str, model: ModelInfo, data: bytes | None = None,
               **seg_options) -> tuple[pydicom.Dataset, np.ndarray, pydicom.Dataset, pydicom.Dataset]:
    source = kept_header(data or source_file(kind))
    frame = 2 if SOURCES[kind][3] > 1 else None
    relevance = cam_relevance(ROWS, COLS)
    study, sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    series, instance = heatmap_uids(study, model.uid, 1, sop, HeatmapKind.SEGMENTATION)
    seg = build_segmentation(source, relevance, model=model, series_uid=series, instance_uid=instance,
                             series_number=9901, instance_number=1, manufacturer="cxr-worker", frame=frame,
                             **seg_options)
    display = cv2.normalize(synthetic_radiograph(ROWS, COLS, 12), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    picture = key_picture(display, relevance, finding="Pneumonia", probability=0.913, threshold=model.threshold,
                          model_name=model.name, model_version=model.version)
    series, instance = heatmap_uids(study, model.uid, 1, sop, HeatmapKind.KEY_IMAGE)
    sc = build_key_image(source, picture, model=model, series_uid=series, instance_uid=instance, series_number=9902,
                         instance_number=1, manufacturer="cxr-worker", frame=frame)
    return source, relevance, seg, sc


@pytest.mark.parametrize("kind", list(SOURCES))
def test_seg_and_key_image_pass_dciodvfy(kind, model, tmp_path):
    _, _, seg, sc = build_both(kind, model)
    for name, ds in (("seg", seg), ("sc", sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode(ds))
        assert dciodvfy(path) == [], f"{kind} {name}"


@pytest.mark.parametrize("syntax", [RLELossless, ExplicitVRLittleEndian])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_seg_reads_back_with_the_map_at_the_source_geometry(kind, syntax, model, tmp_path):
    source, relevance, seg, _ = build_both(kind, model, transfer_syntax_uid=syntax)
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(seg))
    back = hd.seg.segread(path)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert (back.Rows, back.Columns, int(back.NumberOfFrames)) == (ROWS, COLS, 1)
    assert back.SegmentationType == "FRACTIONAL" and back.MaximumFractionalValue == 255
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PatientID == source.PatientID and back.PatientOrientation == ["R", "F"]
    assert ("FrameOfReferenceUID" in back) == SOURCES[kind][2]
    segment = back.get_segment_description(1)
    assert segment.segmented_property_type == SEGMENT_TYPE
    algorithm = segment.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (model.name, model.version)
    values = back.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                                combine_segments=False, rescale_fractional=True)
    assert values.shape == (1, ROWS, COLS, 1)
    assert np.abs(values[0, :, :, 0] - relevance).max() <= 0.5 / 255 + 1e-6
    reference = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.get("ReferencedFrameNumber") == (2 if SOURCES[kind][3] > 1 else None)


def test_seg_from_the_kept_header_equals_seg_from_the_file_header(model):
    data = source_file("cr-monochrome1-no-frame-of-reference")
    relevance = cam_relevance(ROWS, COLS, seed=3)
    built = []
    for source in (kept_header(data), pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)):
        seg = build_segmentation(source, relevance, model=model, series_uid="1.2.3", instance_uid="1.2.3.4",
                                 series_number=1, instance_number=1, manufacturer="cxr-worker")
        built.append(without_clock(seg))
    assert built[0] == built[1]


def without_clock(ds: pydicom.Dataset) -> bytes:
    """The object's bytes without the values that are the time of building."""
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        ds.pop(keyword, None)
    for item in ds.get("ContributingEquipmentSequence", []):
        item.pop("ContributionDateTime", None)
    return encode(ds)


def test_a_retry_builds_the_same_segmentation(model):
    data = source_file("dx-monochrome2-no-frame-of-reference")
    _, _, first, _ = build_both("dx-monochrome2-no-frame-of-reference", model, data)
    _, _, again, _ = build_both("dx-monochrome2-no-frame-of-reference", model, data)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert without_clock(first) != b"" and without_clock(first) == without_clock(again)


def test_key_image_is_rgb_burned_in_derived_from_the_source(model):
    source, _, _, sc = build_both("dx-monochrome2-no-frame-of-reference", model)
    # colour JPEG (YBR_FULL_422), decoded to RGB by every viewer; flagged lossy with ratio and method
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "YBR_FULL_422", 8)
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1" and float(sc.LossyImageCompressionRatio) > 5
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert "AI heatmap" in sc.SeriesDescription
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert max(sc.Rows, sc.Columns) == PICTURE_LONG_SIDE
    back = pydicom.dcmread(io.BytesIO(encode(sc)))
    assert back.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    # the web page's picture is the key image's own JPEG frame: a JPEG file of the same pixels
    page = Image.open(io.BytesIO(key_image_jpeg(sc)))
    assert page.format == "JPEG" and page.size == (sc.Columns, sc.Rows)
    assert np.abs(np.asarray(page.convert("RGB"), np.int16) - back.pixel_array).mean() < 2.0  # pydicom: as RGB
    back.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(ValueError, match="not JPEG Baseline"):
        key_image_jpeg(back)


def test_picture_has_colour_where_the_map_is_high_grey_where_low_and_the_text_band():
    rows, cols = 500, 400
    display = np.full((rows, cols), 100, np.uint8)
    relevance = np.zeros((50, 40), np.float32)  # another size than the film: resized to it
    relevance[10:20, 5:15] = 1.0
    picture = key_picture(display, relevance, finding="Pneumonia", probability=0.5, threshold=0.42,
                          model_name="m", model_version="1")
    assert picture.dtype == np.uint8 and picture.shape[2] == 3 and max(picture.shape[:2]) == PICTURE_LONG_SIDE
    height = picture.shape[0] - BAND_HEIGHT
    film_width = round(cols * height / rows)
    left = (picture.shape[1] - film_width) // 2
    film = picture[:height, left:left + film_width].astype(int)
    hot = film[int(0.3 * height), int(0.25 * film_width)]
    cold = film[int(0.8 * height), int(0.8 * film_width)]
    assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40, hot  # the colour map's top (red) blended in
    assert cold.tolist() == [100, 100, 100]  # low relevance: the film unchanged
    band = picture[height:].astype(int)
    text = band[:, : picture.shape[1] // 2]
    assert (text.max(axis=2) > 200).sum() > 500  # the burned-in words
    yellow = (band[..., 0] > 200) & (band[..., 1] > 180) & (band[..., 2] < 80)
    assert yellow.sum() > 200  # the warning line is drawn in yellow
    legend = band[:, picture.shape[1] // 2:]
    assert (np.ptp(legend, axis=2) > 100).sum() > 1000  # the coloured scale


def test_percent_never_rounds_to_certainty():
    assert [percent(v) for v in (0.9996, 1.0, 0.0, 0.0004, 0.42, 0.97791)] == [
        "> 99.9 %", "100.0 %", "0.0 %", "< 0.1 %", "42.0 %", "97.8 %"]


def test_warning_text_and_colour_table():
    assert WARNING_TEXT == "AI heatmap, not for diagnosis"
    table = colour_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert not np.array_equal(table[0], table[255])
    assert colourise(np.array([[0.0, 1.0]], np.float32)).tolist() == [[table[0].tolist(), table[255].tolist()]]


def test_blend_and_png(tmp_path):
    grey = np.full((30, 20), 50, np.uint8)
    out = blend(grey, np.ones((7, 7), np.float32))
    assert out.shape == (30, 20, 3) and len(set(out[15, 10].tolist())) > 1
    path = write_png(out, tmp_path / "x.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (20, 30)
        assert np.array_equal(np.asarray(image), out)


@pytest.mark.parametrize("bad, argument", [
    (dict(relevance=np.full((5, 5), 1.5, np.float32)), "relevance"),
    (dict(probability=1.2), "probability"),
    (dict(threshold=0.0), "threshold"),
    (dict(display_u8=np.zeros((5, 5), np.float32)), "display_u8"),
])
def test_bad_picture_arguments_are_named(bad, argument):
    arguments = dict(display_u8=np.zeros((40, 30), np.uint8), relevance=np.zeros((5, 5), np.float32),
                     finding="Pneumonia", probability=0.5, threshold=0.4, model_name="m", model_version="1")
    arguments.update(bad)
    with pytest.raises(ValueError, match=argument):
        key_picture(**arguments)


def test_bad_segmentation_arguments_are_named(model):
    source = kept_header(source_file("cr-monochrome1-no-frame-of-reference"))
    common = dict(model=model, series_uid="1.2.3", instance_uid="1.2.3.4", series_number=1, instance_number=1,
                  manufacturer="cxr-worker")
    with pytest.raises(ValueError, match="relevance must be at the source's geometry"):
        build_segmentation(source, np.zeros((7, 7), np.float32), **common)
    with pytest.raises(ValueError, match="frame"):
        build_segmentation(source, np.zeros((ROWS, COLS), np.float32), frame=0, **common)
    with pytest.raises(ValueError, match="transfer_syntax_uid"):
        build_segmentation(source, np.zeros((ROWS, COLS), np.float32), transfer_syntax_uid="1.2.840.10008.1.2", **common)
    del source.Rows
    with pytest.raises(ValueError, match="Rows"):
        build_segmentation(source, np.zeros((ROWS, COLS), np.float32), **common)


def test_heatmap_uids_are_deterministic_and_distinct():
    args = ("1.2.3", "2.25.1", 1, "1.2.3.4.5")
    seg = heatmap_uids(*args, HeatmapKind.SEGMENTATION)
    assert seg == heatmap_uids(*args, "segmentation")  # a retry writes the same object
    key = heatmap_uids(*args, HeatmapKind.KEY_IMAGE)
    revised = heatmap_uids("1.2.3", "2.25.1", 2, "1.2.3.4.5", HeatmapKind.SEGMENTATION)
    other_image = heatmap_uids("1.2.3", "2.25.1", 1, "1.2.3.4.6", HeatmapKind.SEGMENTATION)
    assert len({*seg, *key}) == 4
    assert revised[0] == seg[0] and revised[1] != seg[1]  # same series, new instance
    assert other_image[0] == seg[0] and other_image[1] != seg[1]
    for uid in (*seg, *key):
        assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    with pytest.raises(ValueError):
        heatmap_uids(*args, "picture")


def _inside(polygon, x: float, y: float) -> bool:
    contour = np.array(polygon[:-1], np.float32).reshape(-1, 1, 2)
    return cv2.pointPolygonTest(contour, (x, y), False) >= 0


@pytest.mark.parametrize("seed", range(6))
def test_polygon_is_closed_small_and_encloses_the_maximum(seed):
    relevance = cam_relevance(ROWS, COLS, seed=seed)
    polygon = strongest_region(relevance)
    assert polygon[0] == polygon[-1] and 4 <= len(polygon) <= MAX_POINTS + 1
    row, col = np.unravel_index(np.argmax(relevance), relevance.shape)
    assert _inside(polygon, col + 0.5, row + 0.5)  # SCOORD: the pixel's centre
    for x, y in polygon:
        assert 0.0 <= x <= COLS and 0.0 <= y <= ROWS
    # a pixel well below the level is outside
    low_rows, low_cols = np.nonzero(relevance < 0.2 * relevance.max())
    if len(low_rows):
        assert not _inside(polygon, low_cols[0] + 0.5, low_rows[0] + 0.5)


def test_polygon_of_a_known_box_and_degenerate_regions():
    relevance = np.zeros((100, 80), np.float32)
    relevance[20:40, 10:30] = 1.0
    polygon = strongest_region(relevance)
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    assert (min(xs), max(xs), min(ys), max(ys)) == (10.5, 29.5, 20.5, 39.5)  # boundary pixels' centres
    single = np.zeros((100, 80), np.float32)
    single[99, 0] = 0.7  # one pixel, in a corner: a box of its corners
    assert strongest_region(single) == ((0.0, 99.0), (1.0, 99.0), (1.0, 100.0), (0.0, 100.0), (0.0, 99.0))
    line = np.zeros((100, 80), np.float32)
    line[50, 10:60] = 1.0
    box = strongest_region(line)
    assert box[0] == box[-1] and _inside(box, 10.5, 50.5) and _inside(box, 59.5, 50.5)
    with pytest.raises(ValueError, match="no positive value"):
        strongest_region(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="level"):
        strongest_region(relevance, level=0.0)


def varied_source(kind: str, seed: int, *, equipment: bool = True) -> bytes:
    """A source of the kind whose every per-study value depends on ``seed`` (and a Latin-1 name)."""
    ds = pydicom.dcmread(io.BytesIO(source_file(kind, seed=seed)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = f"M\xfcller{seed}^J\xfcrgen", f"PID{seed}"
    ds.PatientBirthDate, ds.PatientSex = f"19{50 + seed}0704", "FM"[seed % 2]
    ds.StudyDate, ds.StudyTime, ds.StudyID = f"202401{seed + 10:02d}", f"1{seed}3015", str(seed)
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyDescription = f"ACC{seed}", f"Ref{seed}^B", f"XR {seed}"
    ds.PatientOrientation = [["R", "F"], ["L", "F"], ["A", "F"]][seed % 3]
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = generate_uid()
    if equipment:
        ds.Manufacturer, ds.StationName, ds.AcquisitionDateTime = f"ACME{seed}", f"ROOM{seed}", f"2024010{seed}101010"
    else:
        del ds.Manufacturer
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [RLELossless, ExplicitVRLittleEndian])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_template_path_gives_the_highdicom_reference_bytes(kind, syntax, model):
    clear_segmentation_templates()
    frame = 2 if SOURCES[kind][3] > 1 else None
    for seed in range(4):
        for equipment in (True, False):  # also a different key: no acquisition equipment item
            source = kept_header(varied_source(kind, seed, equipment=equipment))
            relevance = cam_relevance(ROWS, COLS, seed=seed)
            uids = heatmap_uids(str(source.StudyInstanceUID), model.uid, seed, str(source.SOPInstanceUID),
                                HeatmapKind.SEGMENTATION)
            arguments = dict(model=model, series_uid=uids[0], instance_uid=uids[1], series_number=9900 + seed,
                             instance_number=seed + 1, manufacturer="cxr-worker", frame=frame,
                             transfer_syntax_uid=syntax)
            fast = build_segmentation(source, relevance, **arguments)
            # the scorer's path: the byte template's file is the one pydicom writes for build_segmentation
            spliced = pydicom.dcmread(io.BytesIO(encode_segmentation(source, relevance, **arguments)))
            assert spliced.PixelData == fast.PixelData
            assert without_clock(copy.deepcopy(spliced)) == without_clock(copy.deepcopy(fast)), f"seed {seed}"
            reference = build_segmentation_reference(source, relevance, **arguments)
            if syntax == RLELossless:  # the fast path's RLE is imagecodecs' PackBits, the reference's GDCM's
                assert np.array_equal(fast.pixel_array, reference.pixel_array), f"seed {seed} equipment {equipment}"
                del fast.PixelData, reference.PixelData
            assert without_clock(fast) == without_clock(reference), f"seed {seed} equipment {equipment}"
    # every SEG from a template, and each template with its byte template (none fell back to pydicom's writer)
    assert segmentation_template_info() == {"reference": 2, "template": 16, "templates": 2, "byte_templates": 2}


def _rle_frame_decoded(data: bytes, rows: int, cols: int, plugin: str) -> np.ndarray:
    from pydicom.pixels import get_decoder

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation, ds.NumberOfFrames = 0, "MONOCHROME2", 1
    ds.PixelData = pydicom.encaps.encapsulate([data])
    array, _ = get_decoder(RLELossless).as_array(ds, decoding_plugin=plugin)
    return array


@pytest.mark.parametrize("plugin", ["pylibjpeg", "pydicom"])  # and DCMTK: test_template_rle_seg_reads_back...
def test_rle_frame_decodes_exactly_with_every_decoder(plugin):
    rng = np.random.default_rng(2)
    frames = [map_levels(cam_relevance(7, 7, seed=1), 301, 245),  # smooth, an odd size
              rng.integers(0, 256, (40, 333), dtype=np.uint8),   # no runs at all
              np.full((9, 1000), 7, np.uint8),                     # runs longer than 128
              np.zeros((1, 1), np.uint8)]
    for frame in frames:
        data = rle_lossless_frame(frame)
        assert len(data) % 2 == 0 and data[:8] == b"\x01\x00\x00\x00\x40\x00\x00\x00"  # one segment, at 64
        assert np.array_equal(_rle_frame_decoded(data, *frame.shape, plugin), frame), plugin


def test_rle_frame_encodes_each_row_on_its_own():
    import imagecodecs

    frame = np.full((50, 300), 200, np.uint8)  # one long run, were rows allowed to run into each other
    frame[::7, ::5] = 3
    segment = rle_lossless_frame(frame)[64:]
    rows = b"".join(imagecodecs.packbits_encode(row.tobytes()) for row in frame)
    assert segment.rstrip(b"\x00") == rows.rstrip(b"\x00") and len(segment) - len(rows) in (0, 1)
    with pytest.raises(ValueError, match="frame must be a 2-D uint8"):
        rle_lossless_frame(frame.astype(np.uint16))


def test_map_levels_are_within_one_level_of_the_float_map():
    for seed in range(6):
        cells = np.random.default_rng(seed).random((7, 7)).astype(np.float32) ** 3
        cells /= cells.max()
        for rows, cols in ((2500, 2048), (301, 245), (224, 224)):
            levels = map_levels(cells, rows, cols)
            exact = np.around(np.clip(map_to_image(cells, rows, cols), 0, 1) * 255.0)
            assert levels.dtype == np.uint8 and levels.shape == (rows, cols)
            assert np.abs(levels.astype(np.float32) - exact).max() <= 1.0
    for bad in (np.full((7, 7), 1.5, np.float32), np.full((7, 7), np.nan, np.float32), np.zeros(7, np.float32)):
        with pytest.raises(ValueError):
            map_levels(bad, 10, 10)


@pytest.mark.parametrize("kind", ["cr-monochrome1-no-frame-of-reference", "multi-frame-sc"])
def test_template_rle_seg_reads_back_in_highdicom_and_dcmtk(kind, model, tmp_path):
    """The fast path's RLE (not the reference's): highdicom's values and DCMTK's dcmdrle (Orthanc's decoder)."""
    clear_segmentation_templates()
    source = kept_header(source_file(kind))
    frame = 2 if SOURCES[kind][3] > 1 else None
    levels = map_levels(np.random.default_rng(4).random((7, 7)).astype(np.float32), ROWS, COLS)
    for index in range(2):  # the second from the kept template, as the scorer writes it (encode_segmentation)
        data = encode_segmentation(source, levels, model=model, series_uid=generate_uid(), instance_uid=generate_uid(),
                                   series_number=9901, instance_number=index + 1, manufacturer="cxr-worker",
                                   frame=frame, transfer_syntax_uid=RLELossless)
    assert segmentation_template_info() == {"reference": 1, "template": 2, "templates": 1, "byte_templates": 1}
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    back = hd.seg.segread(path)
    values = back.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                                combine_segments=False, rescale_fractional=False)
    assert np.array_equal(values[0, :, :, 0], levels)
    assert dciodvfy(path) == []
    require_tool("dcmdrle")
    plain = tmp_path / "plain.dcm"
    subprocess.run(["dcmdrle", str(path), str(plain)], check=True, capture_output=True, timeout=60)
    decoded = pydicom.dcmread(plain)
    assert decoded.file_meta.TransferSyntaxUID != RLELossless
    assert np.array_equal(decoded.pixel_array, levels)


def test_acquisition_equipment_is_highdicoms():
    from pydicom.uid import BasicTextSRStorage

    base = kept_header(source_file("dx-monochrome2-no-frame-of-reference"))
    variants = []
    for change in ({}, {"AcquisitionDateTime": "20240102101510"}, {"AcquisitionDate": "20240102", "AcquisitionTime": "1015"},
                   {"StationName": "ROOM 7", "InstitutionName": "General", "DeviceSerialNumber": "SN1",
                    "SoftwareVersions": "2.1", "ManufacturerModelName": "DR-1"},
                   {"Manufacturer": ""}, {"Manufacturer": None}, {"SOPClassUID": BasicTextSRStorage}):
        ds = copy.deepcopy(base)
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        variants.append(unpack_source(pack_source(ds)) if "SOPClassUID" not in change else ds)
    for ds in variants:
        try:
            expected = hd.ContributingEquipment.for_image_acquisition(ds)
        except (ValueError, AttributeError):
            expected = None
        got = acquisition_equipment(ds)
        assert (got is None) == (expected is None)
        if got is not None:
            assert got == expected, ds


def test_key_image_is_what_highdicoms_from_ref_dataset_builds(model):
    """build_key_image maps the source as SCImage.from_ref_dataset does (without its 2 ms equipment check)."""
    from worker.heatmap.key_image import SERIES_DESCRIPTION
    from worker.heatmap.segmentation import CHARACTER_SET, highdicom_source

    for equipment in (True, False):
        source = kept_header(varied_source("dx-monochrome2-no-frame-of-reference", 1, equipment=equipment))
        picture = np.random.default_rng(0).integers(0, 256, (300, 240, 3), dtype=np.uint8)
        ours = build_key_image(source, picture, model=model, series_uid="1.2.3", instance_uid="1.2.3.4",
                               series_number=9902, instance_number=1, manufacturer="cxr-worker")
        theirs = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=highdicom_source(source), pixel_array=picture, photometric_interpretation="YBR_FULL_422",
            bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT, patient_orientation=("R", "F"),
            series_instance_uid="1.2.3", series_number=9902, sop_instance_uid="1.2.3.4", instance_number=1,
            manufacturer="cxr-worker", manufacturer_model_name=model.name, software_versions=model.version,
            device_serial_number=model.uid, series_description=SERIES_DESCRIPTION,
            specific_character_set=CHARACTER_SET, transfer_syntax_uid="1.2.840.10008.1.2.4.50")
        for ds in (ours, theirs):  # highdicom's own item (the last) is dated when built
            ds.ContributingEquipmentSequence[-1].pop("ContributionDateTime", None)
        assert ours.ContributingEquipmentSequence == theirs.ContributingEquipmentSequence
        assert len(ours.ContributingEquipmentSequence) == (2 if equipment else 1)
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyInstanceUID", "SpecificCharacterSet"):
            assert str(ours.get(keyword)) == str(theirs.get(keyword)), keyword


def _clockless_sc(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                    "DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        ds.pop(keyword, None)
    ds.ContributingEquipmentSequence[-1].pop("ContributionDateTime", None)
    return encode(ds)


@pytest.mark.parametrize("kind", list(SOURCES))
def test_key_image_byte_template_gives_highdicoms_bytes(kind, model):
    """encode_key_image (the scorer's path) writes build_key_image's object byte for byte, up to the
    clock, across sources, sizes, orientations and with or without acquisition equipment; and its page
    JPEG is the key image's own frame."""
    from worker.heatmap.key_image import clear_key_image_templates, encode_key_image, key_image_template_info

    clear_key_image_templates()
    frame = 2 if SOURCES[kind][3] > 1 else None
    rng = np.random.default_rng(3)
    for seed in range(3):
        for equipment in (True, False):
            source = kept_header(varied_source(kind, seed, equipment=equipment))
            picture = rng.integers(0, 256, (400 + 10 * seed, 300 + 7 * seed, 3), dtype=np.uint8)
            arguments = dict(model=model, series_uid=generate_uid(), instance_uid=generate_uid(),
                             series_number=9902, instance_number=seed + 1, manufacturer="cxr-worker", frame=frame)
            data, page = encode_key_image(source, picture, **arguments)
            built = build_key_image(source, picture, **arguments)
            assert _clockless_sc(data) == _clockless_sc(encode(built)), f"seed {seed} equipment {equipment}"
            assert page == key_image_jpeg(built)
    assert key_image_template_info() == {"templates": 2, "fallbacks": 0}  # one per shape, both kept


def test_byte_templates_look_for_whole_uids_only(model):
    """A model UID that begins like a stand-in's UID ("2.25.11" in "2.25.118...") is no leaked UID."""
    from worker.heatmap.key_image import clear_key_image_templates, encode_key_image, key_image_template_info
    from worker.sr.byte_template import holds_uid

    assert holds_uid(b"UI\x08\x002.25.11\x00", "2.25.11") and not holds_uid(b"2.25.118473", "2.25.11")
    assert not holds_uid(b"1.2.25.11", "2.25.11")
    clear_key_image_templates()
    clear_segmentation_templates()
    source = kept_header(source_file("dx-monochrome2-no-frame-of-reference"))
    for uid in ("2.25.118473", "2.25.121", "1.2.3.41"):  # the stand-ins' UIDs (2.25.11, 2.25.12, 1.2.3.4), longer
        like = ModelInfo(arch=model.arch, name=model.name, version=model.version, threshold=model.threshold, uid=uid)
        ids = dict(model=like, series_uid=generate_uid(), instance_uid=generate_uid(), series_number=1,
                   instance_number=1, manufacturer="cxr-worker")
        encode_key_image(source, np.zeros((40, 30, 3), np.uint8), **ids)
        encode_segmentation(source, np.zeros((ROWS, COLS), np.uint8), **ids)
    assert key_image_template_info() == {"templates": 3, "fallbacks": 0}
    assert segmentation_template_info()["byte_templates"] == 3


def test_quantisation_is_highdicoms_ties_included():
    from worker.heatmap.segmentation import _quantise

    ties = (np.arange(600 * 500, dtype=np.float32) % 511 / 510).reshape(600, 500)  # k / 510: x 255 = k / 2
    for values in (ties, cam_relevance(600, 500, seed=5), np.array([[0.0, 1.0, 0.5 / 255, 1.5 / 255]], np.float32)):
        assert np.array_equal(_quantise(values), np.around(values * 255.0).astype(np.uint8))


@pytest.mark.parametrize("seed", range(8))
def test_polygon_of_a_full_size_map_encloses_the_maximum(seed):
    rows, cols = 2500, 2048  # read on the coarser grid
    relevance = cam_relevance(rows, cols, seed=seed)
    polygon = strongest_region(relevance)
    assert polygon[0] == polygon[-1] and 4 <= len(polygon) <= MAX_POINTS + 1
    row, col = np.unravel_index(np.argmax(relevance), relevance.shape)
    assert _inside(polygon, col + 0.5, row + 0.5)
    assert all(0.0 <= x <= cols and 0.0 <= y <= rows for x, y in polygon)
    low_rows, low_cols = np.nonzero(relevance[::50, ::50] < 0.3 * relevance.max())
    assert not any(_inside(polygon, 50 * c + 0.5, 50 * r + 0.5) for r, c in zip(low_rows, low_cols))


def test_objects_keep_a_latin1_name_as_text(model):
    source = kept_header(varied_source("cr-monochrome1-no-frame-of-reference", 3))
    assert source.SpecificCharacterSet == "ISO_IR 100"
    _, _, seg, sc = build_both("cr-monochrome1-no-frame-of-reference", model,
                               varied_source("cr-monochrome1-no-frame-of-reference", 3))
    for ds in (seg, sc):
        back = pydicom.dcmread(io.BytesIO(encode(ds)))
        assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName).startswith("M\xfcller3^J\xfcrgen")


HOSTILE = {
    "patient-sex-outside-m-f-o": dict(PatientSex="W"),
    "overlong-name": dict(PatientName="A" * 300 + "^B"),
    "bad-dates": dict(StudyDate="2024-01-02", PatientBirthDate="05.04.1923"),
    "bad-time": dict(StudyTime="12:30"),
    "bad-acquisition-datetime": dict(AcquisitionDateTime="2024-01-02 10:00"),
    "no-patient-id": dict(PatientID=None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_invalid_source_values_give_valid_objects_as_for_the_sr(name, model, tmp_path):
    ds = pydicom.dcmread(io.BytesIO(source_file("dx-monochrome2-no-frame-of-reference")))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # pydicom warns of the invalid values a sender may well send
        warnings.simplefilter("ignore")
        for keyword, value in HOSTILE[name].items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(buffer, enforce_file_format=True)
    clear_segmentation_templates()
    for _ in range(2):  # the first builds the template, the second takes it as kept
        source, relevance, seg, sc = build_both("dx-monochrome2-no-frame-of-reference", model, buffer.getvalue())
        spliced = encode_segmentation(source, relevance, model=model, series_uid=seg.SeriesInstanceUID,
                                      instance_uid=seg.SOPInstanceUID, series_number=9901, instance_number=1,
                                      manufacturer="cxr-worker")
        from worker.heatmap.key_image import encode_key_image

        sc_bytes, _ = encode_key_image(source, np.zeros((64, 48, 3), np.uint8),
                                       model=model, series_uid=sc.SeriesInstanceUID, instance_uid=sc.SOPInstanceUID,
                                       series_number=9902, instance_number=1, manufacturer="cxr-worker")
        for label, data in (("seg", encode(seg)), ("sc", encode(sc)), ("seg-bytes", spliced), ("sc-bytes", sc_bytes)):
            path = tmp_path / f"{label}.dcm"
            path.write_bytes(data)
            assert dciodvfy(path) == [], f"{name} {label}"
    assert segmentation_template_info() == {"reference": 1, "template": 4, "templates": 1, "byte_templates": 1}


def test_building_every_object_loads_no_torch_nor_matplotlib_until_a_picture(tmp_path):
    """worker.heatmap needs the model's metadata only (trainer.model_info), not torch (seconds to import);
    matplotlib (the colour table) is imported when the first picture is drawn, not with the package."""
    code = ("import sys, numpy as np, worker.heatmap as h; "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules; "
            "h.key_picture(np.zeros((40, 30), np.uint8), np.ones((7, 7), np.float32), finding='Pneumonia', "
            "probability=0.5, threshold=0.4, model_name='m', model_version='1'); "
            "assert 'torch' not in sys.modules and 'pynetdicom' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr
