"""Where the map is strongest, as a DICOM POLYGON on the source image (for the SR's spatial coordinate).

Coordinates are DICOM SCOORD image coordinates (PS3.3 C.18.6.1.1): (column, row), (0, 0) being the
top-left corner of the top-left pixel, so the centre of pixel (r, c) is (c + 0.5, r + 0.5). A POLYGON's
first and last points are the same (closed).

The region is the connected set of pixels at >= ``level`` x max that contains the maximum; its outer
boundary (through the boundary pixels' centres) is simplified (Douglas-Peucker, OpenCV) to at most
``MAX_POINTS`` vertices, with a tolerance that grows until it fits. Where that polygon would leave the
maximum outside, or the region is too thin to have an area (a line, a point), the region's bounding
box (pixel corners) is given instead: it always encloses the maximum.

A large map is read on every s-th row and column (s = long side // GRID_LONG_SIDE, 4 at 2500 x 2048):
the map is a bilinear upsampling of 7 x 7 cells, so the region's outline is as good within s pixels,
at 1/s^2 of the cost. The points are scaled back to the source's pixels (the grid's pixel i covers
source pixels s*i .. s*i + s - 1).
"""

from __future__ import annotations

import cv2
import numpy as np

#: Maps longer than this are read on a coarser grid (module docstring).
GRID_LONG_SIDE = 512
#: At most this many distinct vertices (the closing point not counted).
MAX_POINTS = 32
#: Douglas-Peucker tolerances tried, as a fraction of the region's perimeter.
_EPSILONS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)

Point = tuple[float, float]


def _box(mask: np.ndarray, step: int, shape: tuple[int, int]) -> tuple[Point, ...]:
    rows, cols = np.nonzero(mask)
    x0, y0 = float(cols.min() * step), float(rows.min() * step)
    x1, y1 = float(min((cols.max() + 1) * step, shape[1])), float(min((rows.max() + 1) * step, shape[0]))
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))


def strongest_region(relevance: np.ndarray, level: float = 0.5) -> tuple[Point, ...]:
    """A closed polygon ((x, y), ..., first point again) around the strongest region of ``relevance``
    (rows x cols, the source image's geometry; any non-negative scale: float relevance or the SEG's
    uint8 levels), in SCOORD image coordinates; see the module docstring."""
    relevance = np.asarray(relevance)
    if relevance.ndim != 2 or relevance.size == 0:
        raise ValueError(f"relevance must be a finite 2-D map, got shape {relevance.shape}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must lie in (0, 1], got {level}")
    shape = relevance.shape
    step = max(1, max(shape) // GRID_LONG_SIDE)
    grid = relevance[::step, ::step].astype(np.float32)  # only the grid is read (a float map or uint8 levels)
    if not np.isfinite(grid).all():
        raise ValueError(f"relevance must be a finite 2-D map, got shape {relevance.shape}")
    peak = float(grid.max())
    if peak <= 0.0:
        raise ValueError("relevance has no positive value: there is no strongest region")
    top_row, top_col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    mask = (grid >= level * peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    region = (labels == labels[top_row, top_col]).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    if cv2.contourArea(contour) <= 0.0 or len(contour) < 3:
        return _box(region, step, shape)
    perimeter = cv2.arcLength(contour, True)
    simple = contour
    for fraction in _EPSILONS:
        simple = cv2.approxPolyDP(contour, fraction * perimeter, True)
        if len(simple) <= MAX_POINTS:
            break
    centre = (float(top_col), float(top_row))  # in the contour's pixel-index coordinates
    if len(simple) < 3 or len(simple) > MAX_POINTS or cv2.pointPolygonTest(simple, centre, False) < 0:
        return _box(region, step, shape)
    half = step / 2.0  # the centre of the source pixels grid pixel i covers

    def scaled(index: int, last: int, size: int) -> float:
        if step > 1 and index in (0, last):  # the grid's edge pixel: the image's edge (pixels 0.. or ..size)
            return 0.0 if index == 0 else float(size)
        return min(index * step + half, float(size))

    points = [(scaled(int(x), grid.shape[1] - 1, shape[1]), scaled(int(y), grid.shape[0] - 1, shape[0]))
              for x, y in simple[:, 0, :]]
    return (*points, points[0])
