"""Is a received instance a chest radiograph the model should score? Header-only.

Also the receive path's structural check (``check_encoding``): one walk over the element headers of
a received file (tags, VRs, lengths; values skipped, Pixel Data sought over), so that a data set cut
short or malformed anywhere is refused before Success instead of being recorded under values taken
from broken bytes (pydicom's header read, by design, accepts a value cut short at the end of the data).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from .intended_use import HEADER_CODES, IntendedUse, Outside, check_header

#: The SOP classes the listener accepts and the scorer scores, with their names.
SCORABLE_SOP_CLASSES = {uid: uid.name for uid in (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)}

HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
               "BodyPartExamined", "ViewPosition", "AccessionNumber",
               # the age check of the intended use (worker/scoring/intended_use.py)
               "PatientAge", "PatientBirthDate", "StudyDate", "AcquisitionDate", "ContentDate"]
#: As tags, once: dcmread converts each keyword of specific_tags on every call (~40 us a file).
_HEADER_TAGS = tuple(Tag(keyword) for keyword in HEADER_TAGS)


#: Reasons ``check`` gives from the header. Every other reason of a not-eligible instance came from
#: decoding its pixels (dicom_io's DicomInputError reasons): the stored copy is unusable, and a resend
#: with different content replaces it (worker/receiver.py).
HEADER_REASONS = ("wrong_sop_class", *(code.value for code in HEADER_CODES),
                  # stored by versions before [intended_use] (body part and lateral view checks)
                  "not_chest", "lateral_view")


@dataclass
class Header:
    study_uid: str
    series_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    accession: str | None
    transfer_syntax: str | None
    dataset: Dataset | None = None  # the parsed header: HEADER_TAGS and read_header's `also`


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().rstrip("\x00") or None


def read_header(path: str | Path, also: Sequence[BaseTag] = ()) -> Header:
    """The few attributes the worker needs, without reading pixel data (raises on unreadable files).

    `also`: tags of further attributes to read in the same parse (the receiver passes those the SR
    will need, worker.sr.SOURCE_TAGS); they are in the returned Header's `dataset`.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*_HEADER_TAGS, *also])
    meta = getattr(ds, "file_meta", None)
    sop_instance = _text(ds, "SOPInstanceUID") or (str(meta.MediaStorageSOPInstanceUID) if meta else "")
    sop_class = _text(ds, "SOPClassUID") or (str(meta.MediaStorageSOPClassUID) if meta else "")
    return Header(
        study_uid=_text(ds, "StudyInstanceUID") or "",
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        accession=_text(ds, "AccessionNumber"),
        transfer_syntax=str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None,
        dataset=ds,
    )


def check(header: Header, use: IntendedUse) -> tuple[bool, str | None, str | None]:
    """(eligible, reason, detail). Reasons are short codes stored in the database: ``wrong_sop_class``,
    or the first header code of intended_use.check_header when ``use.outside`` is decline (flag: the
    image is scored and the scorer marks the result)."""
    if header.sop_class_uid not in SCORABLE_SOP_CLASSES:
        return False, "wrong_sop_class", f"SOP Class {header.sop_class_uid} is not a radiograph class"
    if use.outside is Outside.DECLINE and header.dataset is not None:
        outside = check_header(header.dataset, use)
        if outside:
            return False, outside[0][0].value, "; ".join(detail for _, detail in outside)
    return True, None, None


def invalid_uid(header: Header) -> str | None:
    """Which identifying UID of ``header`` is not a syntactically valid UID (PS3.5 9.1), or None."""
    for name, value in (("StudyInstanceUID", header.study_uid), ("SOPInstanceUID", header.sop_instance_uid),
                        ("SeriesInstanceUID", header.series_uid)):
        if value is not None and not UID(value).is_valid:
            return f"{name} {value[:80]!r} is not a valid UID"
    return None


# -- the structural walk -----------------------------------------------------------------------------------
class BrokenEncoding(ValueError):
    """The encoded data set is cut short or malformed (the message says where)."""


_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VRS = _LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_IMPLICIT_LE, _EXPLICIT_BE, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
_MAX_DEPTH = 32  # nested sequences: more is refused (no recursion limit hit by a hostile file)


@dataclass(frozen=True)
class Encoding:
    """What the walk found: where the data set starts (after the file meta) and its transfer syntax."""

    dataset_offset: int
    transfer_syntax: str


def _tag(value: int) -> str:
    return f"({value >> 16:04X},{value & 0xFFFF:04X})"


class _Walk:
    """Element headers of one encoded data set, read from ``fh`` between its position and ``end``."""

    def __init__(self, fh, end: int, little: bool, implicit: bool) -> None:
        self.fh, self.end, self.implicit = fh, end, implicit
        order = "<" if little else ">"
        self._tag_len = struct.Struct(order + "HHI")    # tag + 4-byte length (implicit VR, items)
        self._short = struct.Struct(order + "H")        # explicit VR 2-byte length
        self._long = struct.Struct(order + "I")         # explicit VR 4-byte length (after 2 reserved bytes)

    def _read(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise BrokenEncoding(f"data set ends inside {what}")
        return data

    def _skip(self, length: int, limit: int, tag: int) -> None:
        pos = self.fh.tell()
        if pos + length > limit:
            raise BrokenEncoding(f"element {_tag(tag)} declares {length} bytes, {max(limit - pos, 0)} remain")
        self.fh.seek(length, os.SEEK_CUR)

    def dataset(self, limit: int, depth: int = 0, in_item: bool = False, top: bool = False) -> None:
        """Elements until ``limit`` (defined length) or, ``in_item`` with undefined length, the Item
        Delimitation Item; raises BrokenEncoding."""
        fh, first = self.fh, top
        self._short_len = 0
        while True:
            pos = fh.tell()
            if pos >= limit:
                if in_item:
                    raise BrokenEncoding("data set ends inside an item (no Item Delimitation Item)")
                if pos > limit:
                    raise BrokenEncoding("an element runs past the end of its item")
                return
            if top and limit - pos < 8:
                tail = fh.read(limit - pos)
                if tail.strip(b"\0"):
                    raise BrokenEncoding("data set ends inside an element header")
                return
            group, elem, length = self._tag_len.unpack(self._read(8, "an element header"))
            tag = group << 16 | elem
            if tag == _ITEM_END:
                if not in_item:
                    raise BrokenEncoding("Item Delimitation Item outside an item")
                return
            if group == 0xFFFE:
                raise BrokenEncoding(f"{_tag(tag)} where an element was expected")
            vr = None
            if not self.implicit:
                vr = self._vr_bytes(length)
                if vr in _LONG_VRS:
                    (length,) = self._long.unpack(self._read(4, f"the header of {_tag(tag)}"))
                elif vr in _VRS:
                    length = self._short_len
                elif first and not vr.isalpha():  # the first element: implicit VR in disguise, which
                    self.implicit, vr = True, None  # pydicom reads the same way (the 8 bytes were its header)
                else:
                    raise BrokenEncoding(f"element {_tag(tag)} has no valid VR ({vr!r})")
            first = False
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and vr in (None, b"OB", b"OW"):  # (None: implicit VR, as pydicom allows)
                    self.fragments(limit)
                elif vr in (None, b"SQ", b"UN"):
                    self.sequence(limit, None, depth, implicit=self.implicit or vr == b"UN")
                else:
                    raise BrokenEncoding(f"element {_tag(tag)} ({vr.decode('ascii', 'replace')}) has undefined length")
            elif vr == b"SQ":
                pos = fh.tell()
                if pos + length > limit:
                    raise BrokenEncoding(f"sequence {_tag(tag)} declares {length} bytes, {max(limit - pos, 0)} remain")
                self.sequence(pos + length, pos + length, depth)
            else:
                self._skip(length, limit, tag)

    def _vr_bytes(self, length_field: int) -> bytes:
        """In explicit VR the 4 bytes after the tag are VR + (2-byte length | 2 reserved bytes)."""
        raw = struct.pack(self._tag_len.format[0] + "I", length_field)
        self._short_len = self._short.unpack(raw[2:])[0]
        return raw[:2]

    def sequence(self, limit: int, end: int | None, depth: int, implicit: bool | None = None) -> None:
        """Items until the Sequence Delimitation Item (``end`` None) or exactly ``end``."""
        if depth >= _MAX_DEPTH:
            raise BrokenEncoding(f"sequences nested deeper than {_MAX_DEPTH}")
        saved = self.implicit
        if implicit is not None:
            self.implicit = implicit
        try:
            stop = end if end is not None else limit
            while True:
                pos = self.fh.tell()
                if end is not None and pos == end:
                    return
                if pos >= stop:
                    raise BrokenEncoding("data set ends inside a sequence (no Sequence Delimitation Item)"
                                         if end is None else "an item runs past the end of its sequence")
                group, elem, length = self._tag_len.unpack(self._read(8, "a sequence"))
                tag = group << 16 | elem
                if tag == _SEQ_END:
                    if end is not None:
                        raise BrokenEncoding("Sequence Delimitation Item in a sequence of defined length")
                    return
                if tag != _ITEM:
                    raise BrokenEncoding(f"{_tag(tag)} where a sequence item was expected")
                if length == _UNDEFINED:
                    self.dataset(stop, depth + 1, in_item=True)
                else:
                    item_end = self.fh.tell() + length
                    if item_end > stop:
                        raise BrokenEncoding(f"an item declares {length} bytes, {max(stop - self.fh.tell(), 0)} remain")
                    self.dataset(item_end, depth + 1)
        finally:
            self.implicit = saved

    def fragments(self, limit: int) -> None:
        """Encapsulated Pixel Data: items of defined length up to the Sequence Delimitation Item."""
        while True:
            group, elem, length = self._tag_len.unpack(self._read(8, "encapsulated Pixel Data"))
            tag = group << 16 | elem
            if tag == _SEQ_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise BrokenEncoding(f"{_tag(tag)} where a Pixel Data fragment was expected")
            self._skip(length, limit, _PIXEL_DATA)


def check_encoding(path: str | Path) -> Encoding:
    """Walk the file's element headers once: the file meta, then every element of the data set whole,
    every sequence and item closed, encapsulated Pixel Data ended by its delimiter, native Pixel Data
    within the file. Values are not read (Pixel Data is sought over); a Deflated data set is inflated
    first. Raises BrokenEncoding (or OSError); returns where the data set starts and its syntax."""
    with open(path, "rb", buffering=16384) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(132)
        if len(head) < 132 or head[128:] != b"DICM":
            raise BrokenEncoding("no DICOM file meta (preamble and 'DICM')")
        meta = _Walk(fh, size, little=True, implicit=False)
        syntax = None
        while True:
            pos = fh.tell()
            peek = fh.read(2)
            if len(peek) < 2 or struct.unpack("<H", peek)[0] != 0x0002:
                fh.seek(pos)
                break
            fh.seek(pos)
            group, elem, length = meta._tag_len.unpack(meta._read(8, "the file meta"))
            vr = meta._vr_bytes(length)
            if vr in _LONG_VRS:
                (length,) = meta._long.unpack(meta._read(4, "the file meta"))
            elif vr in _VRS:
                length = meta._short_len
            else:
                raise BrokenEncoding(f"file meta element {_tag(group << 16 | elem)} has no valid VR")
            if (group << 16 | elem) == _TRANSFER_SYNTAX:
                syntax = meta._read(length, "the Transfer Syntax UID").rstrip(b"\0 ").decode("ascii", "replace")
            else:
                meta._skip(length, size, group << 16 | elem)
        if syntax is None:
            raise BrokenEncoding("no Transfer Syntax UID in the file meta")
        offset = fh.tell()
        if syntax == _DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                data = inflater.decompress(fh.read()) + inflater.flush()
            except zlib.error as exc:
                raise BrokenEncoding(f"Deflated data set does not inflate: {exc}") from None
            if not inflater.eof:
                raise BrokenEncoding("Deflated data set ends before its deflate stream does")
            walk = _Walk(io.BytesIO(data), len(data), little=True, implicit=False)
        else:
            walk = _Walk(fh, size, little=syntax != _EXPLICIT_BE, implicit=syntax == _IMPLICIT_LE)
        walk.dataset(walk.end, top=True)
    return Encoding(offset, syntax)
