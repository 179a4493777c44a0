"""The one function from an 8-bit grey image to the model's input.

Training (JPEG) and serving (DICOM) both end here, so the model always sees pixels prepared the
same way. Pure numpy + OpenCV: no torch, so it can run anywhere.
"""

from __future__ import annotations

import cv2
import numpy as np

INPUT_SIZE = 224
"""Model input is INPUT_SIZE x INPUT_SIZE; the Kaggle images were squashed to it (aspect not kept)."""
NORM_MEAN = 0.5
NORM_STD = 0.5
"""The seed's normalisation: (x/255 - 0.5) / 0.5, i.e. [-1, 1]."""


def resize_for_model(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Squash an 8-bit grey image of any size to ``size`` x ``size`` uint8.

    Area interpolation when shrinking (anti-aliased, like a radiograph downscaled for display),
    bilinear when enlarging; the identity when the size already matches.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} with shape {gray.shape}")
    rows, cols = gray.shape
    if rows == size and cols == size:
        return np.ascontiguousarray(gray)
    shrinking = rows >= size and cols >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(gray, (size, size), interpolation=interpolation)


def normalize(image_u8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) -> float32 in [-1, 1] by the model's mean and std."""
    return (image_u8.astype(np.float32) / 255.0 - NORM_MEAN) / NORM_STD


def to_model_input(gray: np.ndarray) -> np.ndarray:
    """8-bit grey image of any size -> float32 array (1, INPUT_SIZE, INPUT_SIZE), normalised."""
    return normalize(resize_for_model(gray))[np.newaxis]
