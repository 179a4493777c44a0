"""Source values made valid for the SR, or left out: never copied verbatim when invalid.

The SR copies the patient, study and equipment attributes of its first source image (highdicom's
Patient/Study copy, the acquisition Contributing Equipment item, the Institution Name). A sender's
value that breaks its VR (PS3.5 6.2) would make our SR non-conformant, so before either SR path
(builder.py, template.py; both start from builder.evidence_copy, hence agree) reads them, each value
of VR_RULES below is checked, per value of a multi-valued element:

=================  ===================================================================================
found              what the SR gets
=================  ===================================================================================
too long           text VRs (SH 16, LO 64, ST 1024, LT 10240 characters; PN 64 per component group,
                   at most 3 groups): truncated to the limit, on a character boundary (the value is a
                   decoded str); what is kept is a true prefix of what was sent
undecodable bytes  (U+FFFD from pydicom's replacement decoding, e.g. invalid UTF-8 under ISO_IR 192):
                   empty; the value it stood for is not known
control characters other than ESC (ISO 2022), and TAB/LF/FF/CR in ST/LT/UT: empty (no guess at what they hid)
non-ASCII text     in a source without Specific Character Set (the default repertoire is ASCII): empty
bad format         AS (nnnD/W/M/Y), CS, DS, IS, DA, TM, DT by pydicom's PS3.5 checks (DA/TM/DT must also
                   be a real date/time): empty
more than 5 PN     components in a group: empty
=================  ===================================================================================

dciodvfy (dicom3tools) checks a PN against 64 characters as a whole, not per component group as PS3.5
6.2 has it since the groups were introduced; a valid multi-group name longer than 64 is kept (the
standard decides), so only such a name can still draw that dciodvfy error.

Empty is the Type 2 answer ("present, value unknown"); the attributes checked here are Type 2 or 3 in
the SR (the UIDs, Type 1, are not touched: the receiver checks those). Only top-level elements are
checked; sequence items are copied as they are.
"""

from __future__ import annotations

import re
from typing import Any

import pydicom
from pydicom import config
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, validate_value

from .sources import _EQUIPMENT_KEYWORDS, _PATIENT_STUDY_KEYWORDS

#: Text VRs and their maximum length in characters (None: no limit short of the Value Length).
TEXT_LIMITS: dict[str, int | None] = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": None, "UT": None}
PN_GROUP_LIMIT = 64
PN_GROUPS = 3
PN_COMPONENTS = 5
#: VRs whose format pydicom's validate_value checks; DA/TM/DT are parsed as well.
FORMAT_VRS = frozenset({"AS", "CS", "DS", "IS", "DA", "TM", "DT"})
_DATE_CLASSES = {"DA": DA, "TM": TM, "DT": DT}
#: The attributes of a source the SR copies (UIDs, SQ and binary VRs are skipped by VR below).
CHECKED_TAGS: frozenset[BaseTag] = frozenset(Tag(kw) for kw in (*_PATIENT_STUDY_KEYWORDS, *_EQUIPMENT_KEYWORDS))
#: Control characters: PS3.5 6.1.2/6.1.3 allow ESC (ISO 2022 code extension) in all text, and TAB, LF,
#: FF, CR only in the text VRs ST, LT, UT (and none in PN, SH, LO, UC).
_CONTROL = re.compile("[\x00-\x1a\x1c-\x1f\x7f\ufffd]")
_CONTROL_IN_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f\ufffd]")
_MULTI_LINE = frozenset({"ST", "LT", "UT"})


class _Invalid(Exception):
    """The value cannot be made valid: the attribute is left empty."""


def _text(value: str, vr: str, ascii_only: bool) -> str:
    if ascii_only and not value.isascii():
        raise _Invalid
    if (_CONTROL_IN_TEXT if vr in _MULTI_LINE else _CONTROL).search(value):
        raise _Invalid
    limit = TEXT_LIMITS[vr]
    return value if limit is None or len(value) <= limit else value[:limit].rstrip(" ")


def _person_name(value: Any, ascii_only: bool) -> str:
    text = str(value)
    if ascii_only and not text.isascii():
        raise _Invalid
    if _CONTROL.search(text):
        raise _Invalid
    groups = text.split("=")[:PN_GROUPS]
    if any(group.count("^") >= PN_COMPONENTS for group in groups):
        raise _Invalid
    return "=".join(group[:PN_GROUP_LIMIT].rstrip(" ") for group in groups).rstrip("=")


def _formatted(value: Any, vr: str) -> Any:
    text = str(value).strip()
    try:
        validate_value(vr, text, config.RAISE)
        date_class = _DATE_CLASSES.get(vr)
        if date_class is not None:
            date_class(text)
    except (ValueError, TypeError, OverflowError):
        raise _Invalid from None
    return value


def _fixed(value: Any, vr: str, ascii_only: bool) -> Any:
    """One value made valid (the same object when it already is); raises _Invalid."""
    if value is None or value == "":
        return value
    if vr == "PN":
        fixed = _person_name(value, ascii_only)
        return value if fixed == str(value) else fixed
    if vr in TEXT_LIMITS:
        return _text(str(value), vr, ascii_only)
    return _formatted(value, vr)


_CHECKED_VRS = frozenset({"PN", *TEXT_LIMITS, *FORMAT_VRS})


def valid_source_values(ds: pydicom.Dataset) -> dict[str, Any]:
    """keyword -> replacement value (None: empty) for each checked attribute of `ds` that is invalid."""
    changes: dict[str, Any] = {}
    charset = ds.get("SpecificCharacterSet")
    ascii_only = charset is None or charset == "" or charset == []
    for tag in ds.keys() & CHECKED_TAGS:
        try:
            element = ds[tag]
        except Exception:  # noqa: BLE001 - pydicom cannot even convert it (e.g. IS "1.5"): left empty
            changes[pydicom.datadict.keyword_for_tag(tag)] = None
            continue
        vr = element.VR
        if vr not in _CHECKED_VRS:
            continue
        value = element.value
        if value is None or value == "":
            continue
        many = isinstance(value, MultiValue)  # (element.VM is a slow property: this is the hot path)
        values = list(value) if many else [value]
        try:
            fixed = [_fixed(v, vr, ascii_only) for v in values]
        except _Invalid:
            changes[element.keyword] = None
            continue
        if any(a is not b for a, b in zip(fixed, values)):
            changes[element.keyword] = fixed if many else fixed[0]
    return changes
