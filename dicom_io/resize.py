"""Display images fitted into a box: the size (aspect kept) and a fast anti-aliased shrink.

The heatmap's key picture places the film in a box (worker/heatmap/overlay.py ``film_box``) and the
decode processes keep each display image shrunk to exactly that size (worker/scoring/prepare.py):
one formula for both, so the picture needs no second resize.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def fit_within(shape: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of an image of ``shape`` scaled, aspect kept, to fit ``box`` (rows, cols) as
    closely as it can (enlarged or shrunk; each side at least 1)."""
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1 or box[0] < 1 or box[1] < 1:
        raise ValueError(f"expected positive sizes, got shape {shape} and box {box}")
    scale = min(box[0] / rows, box[1] / cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def shrink_within(gray: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """An 8-bit grey image shrunk to fit ``box`` (fit_within; area averaging; never enlarged).

    Exact halvings first (OpenCV's area average at a factor of two is a 2 x 2 mean, ~0.3 ms at
    2500 x 2048; Pillow's ``reduce`` where a side is odd), then Pillow's box filter to the size: nearly
    the picture of one box resize (on average within 1.5 grey levels on blurred noise, tested), at
    about half its cost."""
    gray = np.ascontiguousarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} with shape {gray.shape}")
    height, width = fit_within(gray.shape, box)
    if height >= gray.shape[0] or width >= gray.shape[1]:
        return gray
    image = gray
    while image.shape[0] >= 2 * height and image.shape[1] >= 2 * width:
        r, c = image.shape
        if r % 2 == 0 and c % 2 == 0:
            image = cv2.resize(image, (c // 2, r // 2), interpolation=cv2.INTER_AREA)
        else:
            image = np.asarray(Image.fromarray(image).reduce(2))
    if image.shape != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))
    return image
