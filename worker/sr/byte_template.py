"""Byte templates: a DICOM file as constant runs and per-study slots (used by worker/sr/template.py
for the SR and worker/heatmap/segmentation.py for the Segmentation).

This is the encoding half of the SR and SEG templates, kept apart from what decides *which* elements
are per-study (worker/sr/template.py, worker/heatmap/segmentation.py) so that each can be read on its
own. It knows nothing about SRs:
`dataset_parts` encodes a data set exactly the way pydicom's write_dataset does (Explicit VR Little
Endian), except that the elements and sequence items marked in `marks` are left as slots, and
sequences/items that hold slots become boxes whose lengths are only known once the slots are
filled. `Template.render` fills the slots with pydicom's own element/item writers, recomputes the
enclosing lengths, and prepends the preamble and the file meta group length.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.tag import BaseTag

SlotKey = tuple  # e.g. ("copy", tag), ("source", 1, "SOPInstanceUID"), ("certainty", "ds")
#: (0002,0000) File Meta Information Group Length: written by Template.render, not templated.
META_GROUP_LENGTH = 0x00020000
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_HEAD = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_META_GROUP_LENGTH_HEAD = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, 4 bytes
_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class _Slot:
    """An element (or, with tag None, a sequence item) whose value each study supplies."""

    key: SlotKey
    tag: BaseTag | None
    vr: str | None
    encodings: Any


@dataclass(frozen=True)
class _Box:
    """A sequence or item holding slots: its length is known only once they are filled."""

    head: bytes
    parts: tuple
    undefined: bool
    end: bytes


Part = bytes | _Slot | _Box


def _writer() -> DicomBytesIO:
    """An Explicit VR Little Endian buffer for pydicom's writers."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _element_bytes(elem: DataElement, encodings: Any) -> bytes:
    """One element as pydicom's write_data_element writes it."""
    fp = _writer()
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _item_bytes(item: pydicom.Dataset, encodings: Any) -> bytes:
    """One sequence item as pydicom's write_sequence_item writes it."""
    fp = _writer()
    write_sequence_item(fp, item, encodings)
    return fp.getvalue()


def dataset_parts(ds: pydicom.Dataset, encodings: Any, marks: dict[int, SlotKey]) -> list[Part]:
    """`ds` encoded the way pydicom's write_dataset does, with marked elements/items left as slots.

    `marks` maps id() of an element or sequence item of `ds` (at any depth) to its slot key.
    """
    encodings = ds.get("SpecificCharacterSet", encodings)
    parts: list[Part] = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths are not written
            continue
        elem = ds[tag]
        if id(elem) in marks:
            parts.append(_Slot(marks[id(elem)], elem.tag, elem.VR, encodings))
        elif elem.VR == "SQ":
            inner = convert_encodings(encodings)  # what write_data_element hands to the items
            items = []
            for item in elem.value:
                if id(item) in marks:
                    items.append(_Slot(marks[id(item)], None, None, inner))
                else:
                    undefined = bool(getattr(item, "is_undefined_length_sequence_item", False))
                    items.append(_Box(_ITEM_HEAD, tuple(dataset_parts(item, inner, marks)), undefined,
                                      _ITEM_END if undefined else b""))
            head = struct.pack("<HH", tag.group, tag.element) + b"SQ\x00\x00"
            undefined = bool(elem.is_undefined_length)
            parts.append(_Box(head, tuple(items), undefined, _SEQUENCE_END if undefined else b""))
        else:
            parts.append(_element_bytes(elem, encodings))
    return _compact(parts)


def _compact(parts: Sequence[Part]) -> list[Part]:
    """Boxes without slots become bytes; neighbouring bytes are joined."""
    out: list[Part] = []
    for part in parts:
        if isinstance(part, _Box):
            inner = _compact(part.parts)
            part = _Box(part.head, tuple(inner), part.undefined, part.end)
            if all(isinstance(p, bytes) for p in inner):
                part = _render([part], _no_slots)
        if isinstance(part, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += part
        else:
            out.append(part)
    return out


def _no_slots(slot: _Slot) -> bytes:
    """The fill for parts known to hold no slot."""
    raise AssertionError(f"unfilled slot {slot.key}")


def _render(parts: Sequence[Part], fill: Callable[[_Slot], bytes]) -> bytes:
    """The bytes of `parts`, slots encoded by `fill`, box lengths computed."""
    chunks = []
    for part in parts:
        if type(part) is bytes:
            chunks.append(part)
        elif type(part) is _Box:
            body = _render(part.parts, fill)
            length = _UNDEFINED_LENGTH if part.undefined else len(body)
            chunks.append(part.head + struct.pack("<I", length) + body + part.end)
        else:
            chunks.append(fill(part))
    return b"".join(chunks)


def constant_bytes(parts: Sequence[Part]) -> bytes:
    """All constant runs of `parts` (box heads and lengths left out), to look for leaked values."""
    return b"".join(p if isinstance(p, bytes) else constant_bytes(p.parts) if isinstance(p, _Box) else b""
                    for p in parts)


def holds_uid(data: bytes, uid: str) -> bool:
    """Whether ``uid`` is in ``data`` as a whole value (not a part of a longer UID: "2.25.11" is not in
    "2.25.118..."), to look for a per-study UID left in a template's constant runs."""
    return re.search(rb"(?<![0-9.])" + re.escape(uid.encode()) + rb"(?![0-9.])", data) is not None


@dataclass(frozen=True)
class Template:
    """One shape's file: file meta (without its group length) and data set as constant runs and slots."""

    meta: tuple
    body: tuple

    @classmethod
    def cut(cls, ds: pydicom.Dataset, marks: dict[int, SlotKey]) -> Template:
        """``ds`` and its file meta cut into a template (dataset_parts of each, in the default character
        set until the data set names its own); the meta's group length is left to render()."""
        meta = pydicom.Dataset()
        for elem in ds.file_meta:
            if elem.tag != META_GROUP_LENGTH:
                meta.add(elem)
        return cls(tuple(dataset_parts(meta, default_encoding, marks)), tuple(dataset_parts(ds, default_encoding, marks)))

    def constants(self) -> bytes:
        """All constant runs (constant_bytes of the meta and the body), to look for leaked values."""
        return constant_bytes(self.meta) + constant_bytes(self.body)

    def leaks(self, uids: Iterable[str]) -> bool:
        """Whether one of ``uids`` is left, as a whole value (holds_uid), in the constant runs."""
        constant = self.constants()
        return any(holds_uid(constant, uid) for uid in uids)

    def render(self, value: Callable[[SlotKey], Any]) -> bytes:
        """The Part 10 file with each slot's value from `value(key)` (a DataElement, a Dataset for an
        item slot, or a raw value); each (key, tag) is encoded once per call."""
        encoded: dict[tuple, bytes] = {}

        def fill(slot: _Slot) -> bytes:
            memo = (slot.key, slot.tag)
            if memo not in encoded:
                v = value(slot.key)
                if slot.tag is None:  # a whole sequence item
                    encoded[memo] = _item_bytes(v, slot.encodings)
                else:
                    elem = v if isinstance(v, DataElement) else DataElement(slot.tag, slot.vr, v)
                    encoded[memo] = _element_bytes(elem, slot.encodings)
            return encoded[memo]

        meta = _render(self.meta, fill)
        return b"".join((_PREAMBLE, _META_GROUP_LENGTH_HEAD, struct.pack("<I", len(meta)), meta,
                         _render(self.body, fill)))
