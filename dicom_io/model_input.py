"""The one function from an 8-bit grey image to the model's input.

Training (JPEG) and serving (DICOM) both end here, so the model always sees pixels prepared the
same way. Pure numpy + OpenCV: no torch, so it can run anywhere.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

INPUT_SIZE = 224
"""Model input is INPUT_SIZE x INPUT_SIZE; the Kaggle images were squashed to it (aspect not kept)."""
NORM_MEAN = 0.5
NORM_STD = 0.5
"""The seed's normalisation: (x/255 - 0.5) / 0.5, i.e. [-1, 1]."""


def resize_for_model(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Squash an 8-bit grey image of any size to ``size`` x ``size`` uint8.

    Area averaging when shrinking (anti-aliased, like a radiograph downscaled for display; Pillow's
    BOX filter: 3.8 ms for 2500x2048 against 9.6 ms for OpenCV's INTER_AREA at a non-integer
    factor, within 2 grey levels of it), bilinear when enlarging; the identity when the size matches.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} with shape {gray.shape}")
    rows, cols = gray.shape
    if rows == size and cols == size:
        return np.ascontiguousarray(gray)
    if rows >= size and cols >= size:
        return np.array(Image.fromarray(gray).resize((size, size), Image.Resampling.BOX))
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR)


def map_to_image(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Undo the squash for a map over the model input: a float map (h, w) over the INPUT_SIZE square
    (a class-activation map, 7 x 7 for ResNet18) -> float32 (rows, cols) over the image it came from.

    resize_for_model squashed the whole image to the square (aspect not kept), so the map's cell
    (i, j) covers the same fraction of the image: bilinear interpolation between cell centres
    (OpenCV's pixel-centre convention), each axis scaled on its own.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or rows < 1 or cols < 1:
        raise ValueError(f"expected a 2-D map and a positive size, got {values.shape} -> {rows}x{cols}")
    return cv2.resize(values, (int(cols), int(rows)), interpolation=cv2.INTER_LINEAR)


def normalize_values(values):
    """Grey levels 0..255 as floats -> the model's input, in [-1, 1] by its mean and std.

    The one copy of the formula. Operators only, so it takes a numpy array (normalize) or a torch
    tensor (the trainer's batches, on any device) without this package importing torch.
    """
    return (values / 255.0 - NORM_MEAN) / NORM_STD


def normalize(image_u8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) -> float32 in [-1, 1] by the model's mean and std."""
    return normalize_values(image_u8.astype(np.float32))


def to_model_input(gray: np.ndarray) -> np.ndarray:
    """8-bit grey image of any size -> float32 array (1, INPUT_SIZE, INPUT_SIZE), normalised."""
    return normalize(resize_for_model(gray))[np.newaxis]
