"""Training (Kaggle JPEG) and serving (DICOM) meet in the same model input.

A real Kaggle JPEG is wrapped into a 12-bit DICOM whose window maps the stored values back onto
the JPEG's grey levels; the DICOM path must give the same model input as the JPEG path (max
difference <= 1/255 before normalisation), for MONOCHROME2 and MONOCHROME1, with and without
rescale, and with sub-grey-level detail in the 12 bits (as a real detector has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from testkit.dicom_factory import OFFSET, wrap_grey_as_dicom as wrap_as_dicom

from dicom_io import load_display_image, read_image_file, resize_for_model, to_model_input

def assert_same_model_input(jpeg: Path, dicom: Path, *, tolerance_levels: int) -> None:
    from_jpeg, from_dicom = load_display_image(jpeg), load_display_image(dicom)
    assert from_dicom.source == "dicom" and from_jpeg.source == "image"
    resized_jpeg = resize_for_model(from_jpeg.pixels).astype(np.float32) / 255
    resized_dicom = resize_for_model(from_dicom.pixels).astype(np.float32) / 255
    assert np.abs(resized_jpeg - resized_dicom).max() <= tolerance_levels / 255 + 1e-7
    inputs = to_model_input(from_jpeg.pixels), to_model_input(from_dicom.pixels)
    assert inputs[0].shape == inputs[1].shape == (1, 224, 224)
    assert np.abs(inputs[0] - inputs[1]).max() <= 2 * tolerance_levels / 255 + 1e-6  # normalised by std 0.5


@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
def test_kaggle_jpeg_and_wrapped_dicom_give_same_input(kaggle_jpegs, tmp_path: Path, monochrome1: bool,
                                                       function: str) -> None:
    files = kaggle_jpegs["NORMAL"][:2] + kaggle_jpegs["PNEUMONIA"][:2]
    assert files, "no Kaggle JPEGs found"
    for index, jpeg in enumerate(files):
        grey = read_image_file(jpeg)
        dicom = wrap_as_dicom(grey, tmp_path / f"{index}.dcm", monochrome1=monochrome1, function=function)
        assert np.array_equal(load_display_image(dicom).pixels, grey), f"{jpeg.name}: window does not invert"
        assert_same_model_input(jpeg, dicom, tolerance_levels=0)


@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
def test_sub_grey_detail_and_rescale_stay_within_one_level(kaggle_jpegs, tmp_path: Path, monochrome1: bool) -> None:
    """Real 12-bit data carries detail between the 8-bit levels; it may move a pixel by at most 1/255."""
    rng = np.random.default_rng(7)
    for index, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][:3]):
        grey = read_image_file(jpeg)
        dither = rng.integers(-OFFSET, OFFSET, size=grey.shape)  # stays inside the grey level's 16 values
        dicom = wrap_as_dicom(grey, tmp_path / f"{index}.dcm", monochrome1=monochrome1, intercept=-1024,
                              dither=dither, bits_stored=14)  # a 14-bit detector with Rescale Intercept
        shown = load_display_image(dicom).pixels
        assert np.abs(shown.astype(int) - grey).max() == 1, "dither should move some pixels by one level"
        assert_same_model_input(jpeg, dicom, tolerance_levels=1)
