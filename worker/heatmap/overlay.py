"""The heatmap as a picture: a colour map blended into the windowed radiograph, a legend and burned-in text.

One function draws it (``key_picture``), for the three places that show it: the RGB Secondary
Capture key image (key_image.py), ``classify --heatmap DIR`` (PNG) and the web page (JPEG).

Colour map: matplotlib's ``turbo``, as a 256-entry table computed once. The value is carried by hue
(blue -> green -> yellow -> red), not by lightness alone, so it stays apart from the grey levels of
the film beneath it; turbo is the smooth, perceptually improved form of the rainbow maps readers know
from heatmaps (no jet banding). Where the relevance is low the film shows through unchanged
(alpha 0 below ``ALPHA_FLOOR``, rising to ``ALPHA_MAX`` at the maximum): a heatmap that tints the
whole film hides the anatomy a reader checks it against.

Size: the long side is ``PICTURE_LONG_SIDE`` = 1024 pixels (radiograph and the text band below it).
A PACS viewport or a web viewer fits a key image to roughly 1000 pixels on a diagnostic or office
screen, so 1024 shows it at about 1:1 with legible text and no resampling blur; the map itself is 7 x 7
cells (ResNet18), so more pixels add no information, while an RGB image at the source's 2500 x 2048
would be 15 MB instead of ~2.5 MB on every positive study.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_io import fit_within

#: The picture's long side in pixels (module docstring: why 1024).
PICTURE_LONG_SIDE = 1024
#: Height of the band under the radiograph that holds the text and the legend.
BAND_HEIGHT = 136
#: The picture is at least this wide, so the band's text fits beside a narrow (portrait) film.
MIN_WIDTH = 720
#: Relevance below this is fully transparent; above, alpha rises linearly to ALPHA_MAX at 1.
ALPHA_FLOOR = 0.2
ALPHA_MAX = 0.55
COLOUR_MAP = "turbo"
WARNING_TEXT = "AI heatmap, not for diagnosis"
LEGEND_TITLE = "relative evidence"
#: PNG zlib level: 1 is ~5x faster than Pillow's default 6 for a few % more bytes (a page, a CLI file).
PNG_COMPRESS_LEVEL = 1


@functools.cache
def colour_table() -> np.ndarray:
    """(256, 3) uint8: matplotlib's COLOUR_MAP sampled at 256 levels (computed once)."""
    from matplotlib import colormaps  # a second's import, only when a picture is first drawn

    levels = colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(levels * 255.0).astype(np.uint8)


def _check_relevance(relevance: np.ndarray) -> np.ndarray:
    relevance = np.asarray(relevance, dtype=np.float32)
    if relevance.ndim != 2 or relevance.size == 0:
        raise ValueError(f"relevance must be a 2-D map, got shape {relevance.shape}")
    if not np.isfinite(relevance).all() or relevance.min() < 0.0 or relevance.max() > 1.0:
        raise ValueError("relevance must hold finite values in [0, 1] (trainer.cam.relevance)")
    return relevance


def _levels(relevance: np.ndarray) -> np.ndarray:
    return np.rint(relevance * 255.0).astype(np.uint8)


def colourise(relevance: np.ndarray) -> np.ndarray:
    """A relevance map (float in [0, 1], rows x cols) -> RGB uint8 (rows, cols, 3) through the colour map."""
    return colour_table()[_levels(_check_relevance(relevance))]


def _alpha(levels: np.ndarray) -> np.ndarray:
    """The blend's opacity per relevance level (float in [0, 1]): 0 below ALPHA_FLOOR, then linear to ALPHA_MAX."""
    return np.clip((levels - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0) * ALPHA_MAX


@functools.cache
def _blend_table() -> np.ndarray:
    """(65536,) uint32: the blended RGB (bytes R, G, B, 0) of every (relevance level, grey level) pair,
    index level * 256 + grey: round(grey + alpha (colour - grey)), computed once, so that blending a
    picture is one table lookup per pixel."""
    alpha = _alpha(np.arange(256, dtype=np.float64) / 255.0)[:, None, None]     # level, 1, 1
    colour = colour_table().astype(np.float64)[:, None, :]                        # level, 1, rgb
    grey = np.arange(256, dtype=np.float64)[None, :, None]                        # 1, grey, 1
    rgbx = np.zeros((256, 256, 4), np.uint8)
    rgbx[..., :3] = np.clip(np.rint(grey + alpha * (colour - grey)), 0, 255)
    return rgbx.reshape(-1).view(np.uint32)


def _levels_at(relevance: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 relevance levels (0..255) at ``shape``: a smaller map is checked and quantised first, then
    interpolated bilinearly as levels (OpenCV's 8-bit fixed point: within one level of interpolating
    the floats, at a fraction of the cost)."""
    levels = _levels(_check_relevance(relevance))
    if levels.shape != shape:
        levels = cv2.resize(levels, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return levels


def _blended(grey: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """(rows, cols) uint32 RGBX of the blend (_blend_table), for a grey uint8 picture and any-size map."""
    index = _levels_at(relevance, grey.shape).astype(np.uint16) << 8
    index |= grey
    return np.take(_blend_table(), index)


def blend(display_u8: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """An 8-bit grey display image (any size) with the relevance map (any size, resized bilinearly to the
    picture) blended in: RGB uint8 of the picture's size; transparent where the relevance is low.

    grey + alpha (colour - grey) per pixel, with alpha and colour by relevance level (_blend_table).
    """
    grey = np.asarray(display_u8)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"display_u8 must be a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    rows, cols = grey.shape
    return np.asarray(Image.frombytes("RGB", (cols, rows), _blended(np.ascontiguousarray(grey), relevance), "raw", "RGBX"))


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _legend(draw: ImageDraw.ImageDraw, left: int, top: int, width: int, height: int) -> None:
    """The colour scale (low..high) with its meaning, as in the picture."""
    table = colour_table()
    for x in range(width):
        colour = tuple(int(v) for v in table[x * 255 // (width - 1)])
        draw.line([(left + x, top), (left + x, top + height - 1)], fill=colour)
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline=(255, 255, 255))
    small = _font(16)
    draw.text((left, top - 22), LEGEND_TITLE, font=small, fill=(255, 255, 255))
    draw.text((left, top + height + 4), "low", font=small, fill=(255, 255, 255))
    draw.text((left + width, top + height + 4), "high", font=small, fill=(255, 255, 255), anchor="ra")


#: Where the band's lines and the legend lie, from the band's top.
_TEXT_TOP, _FINDING_TOP, _MODEL_TOP, _LEGEND_TOP, LEGEND_WIDTH = 10, 52, 82, 50, 200


@functools.lru_cache(maxsize=32)
def _band(width: int, model_name: str, model_version: str) -> Image.Image:
    """The band's fixed part for a picture ``width`` wide: the warning, the model and the legend (drawn
    once per width and model; a site has a few detector shapes). Never changed by the caller."""
    band = Image.new("RGB", (width, BAND_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    draw.text((14, _TEXT_TOP), WARNING_TEXT, font=_font(28), fill=(255, 220, 0))
    draw.text((14, _MODEL_TOP), f"model {model_name} {model_version}", font=_font(18), fill=(200, 200, 200))
    _legend(draw, width - LEGEND_WIDTH - 24, _LEGEND_TOP, LEGEND_WIDTH, 20)
    return band


def film_box(size: int = PICTURE_LONG_SIDE) -> tuple[int, int]:
    """(rows, cols) the film is fitted into in a picture of long side ``size``: the band below it
    (the decode processes shrink each display image to fit it: ModelRunner(preview_box=...))."""
    if size < 2 * BAND_HEIGHT:
        raise ValueError(f"size must be at least {2 * BAND_HEIGHT}, got {size}")
    return size - BAND_HEIGHT, size


def percent(value: float) -> str:
    """A probability as the picture writes it: one decimal, never a rounded 100 % or 0 % that is not."""
    text = f"{100 * value:.1f} %"
    if text == "100.0 %" and value < 1.0:
        return "> 99.9 %"
    if text == "0.0 %" and value > 0.0:
        return "< 0.1 %"
    return text


def key_picture(display_u8: np.ndarray, relevance: np.ndarray, *, finding: str, probability: float,
                threshold: float, model_name: str, model_version: str,
                size: int = PICTURE_LONG_SIDE) -> np.ndarray:
    """The heatmap picture: RGB uint8 whose long side is ``size``.

    The windowed radiograph (``display_u8``, as dicom_io renders it) with the colour map blended in,
    and under it a band with the warning "AI heatmap, not for diagnosis", the finding and probability
    (with the model's threshold), the model's name and version, and the colour legend.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    if size < 2 * BAND_HEIGHT:
        raise ValueError(f"size must be at least {2 * BAND_HEIGHT}, got {size}")
    grey = np.asarray(display_u8)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"display_u8 must be a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    height, width = fit_within(grey.shape, film_box(size))
    if height * 2 <= grey.shape[0]:  # a Gaussian halving first: the same anti-aliasing, half the cost of INTER_AREA alone
        grey = cv2.pyrDown(grey)
    small = grey if grey.shape == (height, width) else cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    picture = Image.frombytes("RGB", (width, height), _blended(np.ascontiguousarray(small), relevance), "raw", "RGBX")

    canvas = Image.new("RGB", (max(width, MIN_WIDTH), height + BAND_HEIGHT), (0, 0, 0))
    canvas.paste(picture, ((canvas.width - width) // 2, 0))
    canvas.paste(_band(canvas.width, model_name, model_version), (0, height))
    # the decision, the probability it rests on and the threshold (the legend takes the right side)
    ImageDraw.Draw(canvas).text(
        (14, height + _FINDING_TOP), f"{finding}: pneumonia {percent(probability)}, threshold {percent(threshold)}",
        font=_font(20), fill=(255, 255, 255))
    return np.asarray(canvas)


def _encoded(rgb: np.ndarray, **options) -> bytes:
    """An RGB uint8 picture saved by Pillow with ``options``, as bytes."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (rows, cols, 3) uint8, got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, **options)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 picture as PNG bytes (zlib level PNG_COMPRESS_LEVEL: fast)."""
    return _encoded(rgb, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 picture as JPEG bytes (the web page's overlay: a tenth of PNG's cost)."""
    return _encoded(rgb, format="JPEG", quality=quality)


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 picture as PNG (png_bytes)."""
    path = Path(path)
    path.write_bytes(png_bytes(rgb))
    return path
