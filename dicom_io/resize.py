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
    """An 8-bit grey image shrunk to fit ``box`` (fit_within; anti-aliased; never enlarged).

    Exact halvings first (OpenCV's area average at a factor of two is a 2 x 2 mean, ~0.3 ms at
    2500 x 2048; Pillow's ``reduce`` where a side is odd) while the image is at least twice the size,
    then a bilinear resize by the remaining factor, which lies in (0.5, 1]: there every output pixel
    still draws on every input pixel near it, so no detail is skipped. Closer to one area-average
    resize from the full image than a box filter after the halvings (on average within 0.2 grey
    levels on blurred noise, tested), at a fifth of its cost (benchmarks/bench_heatmap.py)."""
    gray = np.ascontiguousarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} with shape {gray.shape}")
    height, width = fit_within(gray.shape, box)
    if height >= gray.shape[0] or width >= gray.shape[1]:
        return gray
    image, scale = gray, 1  # the halvings so far: one pixel of ``image`` spans ``scale`` of ``gray``
    while image.shape[0] >= 2 * height and image.shape[1] >= 2 * width:
        r, c = image.shape
        if r % 2 == 0 and c % 2 == 0:
            image = cv2.resize(image, (c // 2, r // 2), interpolation=cv2.INTER_AREA)
        else:  # the odd side's last pixel is the mean of the one row/column left
            image = np.asarray(Image.fromarray(image).reduce(2))
        scale *= 2
    if image.shape == (height, width):
        return image
    if image.shape[0] >= 2 * height or image.shape[1] >= 2 * width:
        # a side left more than twice its size (an extreme aspect, a side rounded to 1 pixel): area average
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if image.shape[0] * scale == gray.shape[0] and image.shape[1] * scale == gray.shape[1]:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    # an odd side was halved: the image spans less than its last pixel, so map the output onto the
    # extent ``gray`` covers (resize would stretch it by up to half a pixel)
    sy, sx = gray.shape[0] / scale / height, gray.shape[1] / scale / width
    to_source = np.array([[sx, 0.0, (sx - 1) / 2], [0.0, sy, (sy - 1) / 2]])
    return cv2.warpAffine(image, to_source, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
