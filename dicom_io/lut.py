"""Grey-scale display pipeline of PS3.3 C.11: stored value -> modality LUT -> VOI -> 8-bit display value.

Every step here works on any array of stored values. The caller (``dicom_io.render``) evaluates the
pipeline once per *possible* stored value (at most 65536 of them) and then indexes the image with
the resulting uint8 table, which is exact and about 4x faster than transforming every pixel in
float64. MONOCHROME1 inversion is applied last, after VOI (C.7.6.3.1.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from .errors import DicomInputError

DISPLAY_MAX = 255
"""Top of the 8-bit display range (ymax of C.11.2.1.2; ymin is 0)."""
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
"""With no VOI information at all: window from these percentiles of the (non-padding) pixels."""
LUT_ENTRIES_WHEN_ZERO = 65536
"""LUT Descriptor: a first value of 0 means 2**16 entries (C.11.1.1.1)."""


@dataclass(frozen=True)
class LookupTable:
    """A Modality or VOI LUT (LUT Descriptor + LUT Data)."""

    first_mapped: int
    bits: int
    data: np.ndarray

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Entries for ``values``; inputs below/above the table take its first/last entry (C.11.1.1)."""
        index = np.clip(np.rint(values).astype(np.int64) - self.first_mapped, 0, len(self.data) - 1)
        return self.data[index]


@dataclass(frozen=True)
class Window:
    """One Window Center/Width pair with its VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"


def _lut_data(item: Dataset) -> np.ndarray:
    """LUT Data as integers, whether pydicom gave a list (US) or raw bytes (OW, in the file's byte order)."""
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        _implicit, little_endian = getattr(item, "original_encoding", (None, True))
        return np.frombuffer(raw, dtype="<u2" if little_endian is not False else ">u2").astype(np.int64)
    values = [raw] if isinstance(raw, int) else list(raw)
    return np.asarray(values, dtype=np.int64)


def parse_lut(item: Dataset, *, signed_input: bool) -> LookupTable:
    """A LUT from a Modality/VOI LUT Sequence item.

    The descriptor's first-mapped value is signed when the input is (C.11.1.1.1): it may arrive as
    US holding two's complement, so re-interpret it.
    """
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count, bits = count & 0xFFFF, bits & 0xFFFF  # unsigned even when the element is SS
    if signed_input and first >= 1 << 15:
        first -= 1 << 16
    elif not signed_input and first < 0:
        first += 1 << 16
    data = _lut_data(item)
    count = count or LUT_ENTRIES_WHEN_ZERO
    if len(data) < count:
        raise ValueError(f"LUT Data has {len(data)} entries, the descriptor declares {count}")
    return LookupTable(first_mapped=first, bits=bits, data=data[:count])


def stored_value_domain(bits_allocated: int, bits_stored: int, signed: bool) -> np.ndarray:
    """The stored value represented by each unsigned container code 0 .. 2**bits_allocated - 1.

    Indexing a table over this domain with the image viewed as unsigned (``arr.view(uint16)``)
    maps every pixel exactly; bits above High Bit are ignored and signed values sign-extended from
    Bits Stored, as PS3.5 8.1.1 requires, whatever the decoder left in them.
    """
    codes = np.arange(1 << bits_allocated, dtype=np.int64)
    value_mask = (1 << bits_stored) - 1
    values = codes & value_mask
    if signed:
        sign_bit = 1 << (bits_stored - 1)
        values = (values ^ sign_bit) - sign_bit
    return values


def modality_transform(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values (C.11.1): Modality LUT Sequence, else Rescale Slope/Intercept."""
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        return parse_lut(sequence[0], signed_input=signed).lookup(stored).astype(np.float64)
    slope, intercept = rescale_parameters(ds)
    return stored.astype(np.float64) * slope + intercept


def _rescale_value(ds: Dataset, keyword: str, absent: float) -> float:
    """One of Rescale Slope/Intercept as a finite float; absent or empty -> ``absent``."""
    value = ds.get(keyword)
    if value is None or value == "":
        return absent
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            raise ValueError(f"{len(value)} values")  # type: ignore[arg-type]
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise DicomInputError("bad_rescale", f"{keyword} is not one decimal number ({exc.__class__.__name__})") \
            from None
    if not math.isfinite(number):
        raise DicomInputError("bad_rescale", f"{keyword} {number} is not a finite number (PS3.5 6.2 DS)")
    return number


def rescale_parameters(ds: Dataset) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept) of C.11.1.1.2, absent -> (1, 0); refused when unusable.

    A slope of 0 maps every stored value to the intercept (output = m*SV + b): the image would be one
    flat grey, so there is nothing to score. DCMTK ignores such a modality transform with a warning and
    pydicom applies it (a flat image); we refuse it as ``bad_rescale`` rather than guess a slope of 1.
    NaN/inf (not valid DS, PS3.5 6.2) and non-numeric or multi-valued values are refused the same way.
    """
    slope = _rescale_value(ds, "RescaleSlope", 1.0)
    intercept = _rescale_value(ds, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise DicomInputError("bad_rescale", "Rescale Slope 0 maps every pixel to the intercept: a flat image "
                                             "(PS3.3 C.11.1.1.2)")
    return slope, intercept


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def first_window(ds: Dataset) -> Window | None:
    """The FIRST Window Center/Width pair (the one the modality recommends), or None."""
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    return Window(center=_first(ds.WindowCenter), width=_first(ds.WindowWidth), function=function)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Modality values -> display values in [0, 1] by C.11.2.1.2 (LINEAR) / .3.1 (LINEAR_EXACT) / .3.2 (SIGMOID)."""
    c, w = window.center, window.width
    x = np.asarray(values, dtype=np.float64)
    if window.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; in between the ramp.
    if w <= 1.0:  # a width of 1 is a threshold at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def window_is_valid(window: Window) -> bool:
    """Width must be >= 1 for LINEAR and > 0 for LINEAR_EXACT/SIGMOID (C.11.2.1.2)."""
    minimum_ok = window.width >= 1.0 if window.function == "LINEAR" else window.width > 0.0
    return bool(np.isfinite(window.center) and np.isfinite(window.width) and minimum_ok)


def apply_voi_table(values: np.ndarray, table: LookupTable) -> np.ndarray:
    """Modality values -> display values in [0, 1] through a VOI LUT (output range 0 .. 2**bits - 1)."""
    top = float((1 << table.bits) - 1) if table.bits > 0 else float(table.data.max() or 1)
    return np.clip(table.lookup(values) / top, 0.0, 1.0)


def auto_window_bounds(values: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Low/high AUTO_WINDOW_PERCENTILES of ``values`` weighted by ``counts`` (padding already zeroed).

    Weighted, so it works on a (value, histogram count) table as well as on raw pixels (counts 1).
    Returns (min, max) of the values present when every count is zero.
    """
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    cumulative = np.cumsum(counts[order], dtype=np.float64)
    total = cumulative[-1] if cumulative.size else 0.0
    if total <= 0:
        return float(values.min()), float(values.max())
    low_q, high_q = (p / 100.0 * total for p in AUTO_WINDOW_PERCENTILES)
    low = sorted_values[min(np.searchsorted(cumulative, max(low_q, 1.0)), len(sorted_values) - 1)]
    high = sorted_values[min(np.searchsorted(cumulative, high_q), len(sorted_values) - 1)]
    return float(low), float(high)


def apply_auto_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear ramp from ``low`` (0) to ``high`` (1); a flat image maps to 0 (or 1 above ``low``)."""
    x = np.asarray(values, dtype=np.float64)
    if high <= low:
        return (x > low).astype(np.float64)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def to_display_u8(unit: np.ndarray, *, invert: bool) -> np.ndarray:
    """[0, 1] -> uint8 0..255 (rounded), inverted for MONOCHROME1 (after VOI, never before)."""
    display = np.rint(unit * DISPLAY_MAX).astype(np.uint8)
    return DISPLAY_MAX - display if invert else display
