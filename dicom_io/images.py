"""Ordinary image files (the Kaggle JPEGs, PNGs) to an 8-bit grey image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import DicomInputError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


def is_image_file(path: str | Path) -> bool:
    """True for the file kinds the Kaggle layout uses (by suffix)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def gray_from_array(image: np.ndarray) -> np.ndarray:
    """Grey or colour array (uint8/uint16) to 2-D uint8 grey.

    Colour uses ITU-R BT.601 luma (what OpenCV and PIL use); for the Kaggle RGB files the three
    channels are equal, so this is exact. 16-bit PNGs are scaled to 8 bits.
    """
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]):
            image = image[..., 0]
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim != 2:
        raise DicomInputError("unsupported_image", f"unexpected image shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if image.dtype != np.uint8:
        raise DicomInputError("unsupported_image", f"unexpected image dtype {image.dtype}")
    return np.ascontiguousarray(image)


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG file to a 2-D uint8 grey image, or raise DicomInputError."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DicomInputError("unreadable_image", f"{Path(path).name} is not a readable JPEG/PNG image")
    if image.size == 0:
        raise DicomInputError("empty_image", f"{Path(path).name} has no pixels")
    return gray_from_array(image)
