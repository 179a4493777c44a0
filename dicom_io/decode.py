"""Pixel Data -> the first frame's stored values, with the fastest exact decoder for the transfer syntax.

pydicom 3 picks *a* plugin; we pick the fastest one we measured (docs/pixel_path.md,
benchmarks/bench_dicom_io.py; 2500x2048 12-bit on 2 busy cores) and fall back to any other
installed plugin when the preferred one is missing or fails. Only the first frame is decoded.

JPEG Lossless has no fast pydicom plugin: gdcm and pylibjpeg take 140-185 ms for a 2500x2048 image
and hold the GIL. imagecodecs' libjpeg-turbo 3 (lossless JPEG, 2-16 bit) decodes the same frame
exactly in ~30 ms without the GIL, so it is tried first for those syntaxes ("imagecodecs" below).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

try:  # optional at import time: without it the pydicom plugins below still decode everything
    import imagecodecs
except ImportError:  # pragma: no cover - a dependency of the package
    imagecodecs = None

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)

from .errors import DicomInputError

NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                             DeflatedExplicitVRLittleEndian})
"""Uncompressed Pixel Data (Deflated is inflated by dcmread): no plugin involved."""
LITTLE_ENDIAN_NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
NATIVE_VIEW_DTYPES = {8: "u1", 16: "<u2"}
"""Bits Allocated -> dtype of the unsigned native data _native_view reads without pydicom."""

PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom"),              # 10 ms vs 102 ms
    JPEGBaseline8Bit: ("pillow", "pylibjpeg", "gdcm"),  # 8-bit: libjpeg-turbo 10 ms vs 46 ms
    JPEGExtended12Bit: ("pylibjpeg", "pillow", "gdcm"),  # 12-bit (its point): only pylibjpeg can, 128 ms
    JPEGLossless: ("imagecodecs", "gdcm", "pylibjpeg"),     # 39 ms vs 145 ms vs 185 ms
    JPEGLosslessSV1: ("imagecodecs", "gdcm", "pylibjpeg"),  # 30 ms vs 140 ms vs 165 ms
    JPEGLSLossless: ("pyjpegls", "gdcm", "pylibjpeg"),  # 104 ms vs 175 ms vs 408 ms
    JPEGLSNearLossless: ("pyjpegls", "gdcm", "pylibjpeg"),
    JPEG2000Lossless: ("gdcm", "pylibjpeg", "pillow"),  # 437-557 ms vs 590-788 vs 615-802 (quiet, 12/16-bit)
    JPEG2000: ("gdcm", "pylibjpeg", "pillow"),
}
"""Transfer Syntax UID -> decoding plugins, fastest first (all exact for lossless syntaxes)."""

IMAGECODECS = "imagecodecs"
"""Our own 'plugin': imagecodecs.jpeg8_decode (libjpeg-turbo) on the frame's bytes, JPEG Lossless only."""
IMAGECODECS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})


@dataclass(frozen=True)
class DecodedFrame:
    """Stored values of one frame (2-D, possibly a read-only view) and who decoded them."""

    pixels: np.ndarray
    plugin: str  # "" for native data
    notes: tuple[str, ...] = ()


def transfer_syntax_of(ds: Dataset) -> UID:
    """The dataset's Transfer Syntax UID; for a bare network dataset, guessed from how it was read.

    Only native Pixel Data can be guessed: encapsulated data without a transfer syntax is refused.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(str(meta.TransferSyntaxUID))
    pixel_data = ds.get("PixelData")
    if isinstance(pixel_data, (bytes, bytearray)) and pixel_data[:4] == b"\xfe\xff\x00\xe0":
        raise DicomInputError("unsupported_transfer_syntax",
                              "encapsulated (compressed) Pixel Data but no Transfer Syntax UID to say how")
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _with_transfer_syntax(ds: Dataset, tsyntax: UID) -> Dataset:
    """``ds`` itself when it carries ``tsyntax``; else a shallow copy that does (never mutate the caller's)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == tsyntax:
        return ds
    shallow = copy.copy(ds)
    shallow.file_meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
    shallow.file_meta.TransferSyntaxUID = tsyntax
    return shallow


def plugin_order(tsyntax: UID, available: tuple[str, ...]) -> list[str]:
    """Installed plugins for ``tsyntax``: our preferred ones first, then any other pydicom offers."""
    if imagecodecs is not None and tsyntax in IMAGECODECS_SYNTAXES:
        available = (IMAGECODECS, *available)
    preferred = [name for name in PREFERRED_PLUGINS.get(tsyntax, ()) if name in available]
    return preferred + [name for name in available if name not in preferred]


def decode_first_frame(ds: Dataset, tsyntax: UID) -> DecodedFrame:
    """Decode only frame 0 of ``ds`` (a 2-D array), or raise DicomInputError.

    Reasons: ``unsupported_transfer_syntax`` (no decoder for it), ``decode_failed`` (every installed
    decoder raised; their messages are kept).
    """
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DicomInputError("unsupported_transfer_syntax",
                              f"no pixel data decoder for transfer syntax {tsyntax} ({tsyntax.name})") from exc
    direct = _native_view(ds, tsyntax)
    if direct is not None:
        return DecodedFrame(direct, plugin="")
    source = _with_transfer_syntax(ds, tsyntax)
    if tsyntax in NATIVE_SYNTAXES or not decoder.is_encapsulated:
        return DecodedFrame(frame_with_plugin(decoder, source, ""), plugin="")
    plugins = plugin_order(tsyntax, tuple(decoder.available_plugins))
    if not plugins:
        raise DicomInputError("unsupported_transfer_syntax",
                              f"no installed decoder for {tsyntax.name} ({tsyntax}); install pylibjpeg plugins")
    failures: list[str] = []
    for plugin in plugins:
        try:
            pixels = frame_with_plugin(decoder, source, plugin)
        except Exception as exc:  # noqa: BLE001 - a plugin failing is a reason to try the next one
            failures.append(f"{plugin}: {_short(exc)}")
            continue
        notes = (f"decoder fallback: {'; '.join(failures)}",) if failures else ()
        return DecodedFrame(pixels, plugin=plugin, notes=notes)
    raise DicomInputError("decode_failed", f"cannot decode {tsyntax.name} pixel data: {' | '.join(failures)}")


def _native_view(ds: Dataset, tsyntax: UID) -> np.ndarray | None:
    """Frame 0 of little-endian, unsigned, one-sample 8/16-bit native Pixel Data as a read-only view
    of the bytes already read (no copy: pydicom's as_array copies 10 MB for a 2500x2048 image).

    Bits above High Bit are left as sent (pydicom clears them; render's table ignores them).
    None for anything else (big endian, signed, packed or 32-bit data, a short buffer): pydicom decodes those.
    """
    if tsyntax not in LITTLE_ENDIAN_NATIVE:
        return None
    pixel_data = ds.get("PixelData")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if (not isinstance(pixel_data, bytes) or bits not in NATIVE_VIEW_DTYPES
            or int(ds.get("PixelRepresentation", 0) or 0) != 0 or int(ds.get("SamplesPerPixel", 1) or 1) != 1):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(NATIVE_VIEW_DTYPES[bits])
    if len(pixel_data) < rows * cols * dtype.itemsize:
        return None
    return np.frombuffer(pixel_data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def _imagecodecs_frame(source: Dataset) -> np.ndarray:
    """Frame 0 of JPEG Lossless Pixel Data through libjpeg-turbo, checked against the header.

    Signed data is left to pydicom (it converts the decoded two's complement for us).
    """
    if int(source.get("PixelRepresentation", 0) or 0) != 0:
        raise ValueError("signed pixel data: left to the pydicom plugins")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    pixels = imagecodecs.jpeg8_decode(get_frame(source.PixelData, 0, number_of_frames=frames))
    expected = (int(source.Rows), int(source.Columns))
    if pixels.shape != expected:
        raise ValueError(f"decoded shape {pixels.shape} differs from Rows x Columns {expected}")
    container = np.uint8 if int(source.BitsAllocated) == 8 else np.uint16
    if pixels.dtype != container:
        if pixels.dtype.itemsize > np.dtype(container).itemsize:
            raise ValueError(f"decoded {pixels.dtype} does not fit Bits Allocated {source.BitsAllocated}")
        pixels = pixels.astype(container)
    return pixels


def frame_with_plugin(decoder, source: Dataset, plugin: str) -> np.ndarray:
    """Frame 0 as stored values: ``raw`` keeps YBR as is (we refuse colour anyway, before decoding)."""
    if plugin == IMAGECODECS:
        return _imagecodecs_frame(source)
    pixels, _meta = decoder.as_array(source, index=0, raw=True, decoding_plugin=plugin)
    if not pixels.dtype.isnative:  # Explicit VR Big Endian comes back as '>u2': swap once, here
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels


def _short(exc: Exception, limit: int = 200) -> str:
    """One-line exception text for a DB column / log line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
