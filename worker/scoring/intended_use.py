"""Is an image inside the model's intended use? Header checks, pure (no torch, no database).

The one home of the header checks: Modality, BodyPartExamined, ViewPosition and the patient's age
(PatientAge, else PatientBirthDate with StudyDate, else AcquisitionDate, else ContentDate). A value
that is absent is unknown, and unknown is not outside. The receiver (through eligibility.check), the
scorer and ``cxr-worker classify`` all call ``check_header``; the pixel check (the out-of-distribution
detector) is the runner's (worker/scoring/runner.py).

What "inside" means comes from the checkpoint's ``intended_use`` (trainer/model_info.py), which a
site may replace key by key in ``[intended_use]`` of its configuration (an empty list / a negative
age means "the model's"); ``outside`` says whether an image outside is declined (no finding) or
scored and flagged.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Mapping

#: A list value meaning "any value" (no check) in [intended_use].
ANY = "*"
#: The checks for a checkpoint that states no intended use (format 1): the chest-only, no-lateral
#: rule the worker applied before intended use existed (studies.allowed_body_parts = ["CHEST"]).
LEGACY_USE = {"modalities": [], "body_parts": ["CHEST"], "view_positions": ["AP", "PA"]}


class NotAssessed(str, enum.Enum):
    """Why an image (or a study) got no finding: short stable codes, stored and reported as they are."""

    MODALITY = "modality"
    BODY_PART = "body_part"
    VIEW_POSITION = "view_position"
    AGE = "age"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    UNDECODABLE = "undecodable"
    NOT_ELIGIBLE = "not_eligible"


_CODES = frozenset(code.value for code in NotAssessed)
#: The codes a header check gives.
HEADER_CODES = (NotAssessed.MODALITY, NotAssessed.BODY_PART, NotAssessed.VIEW_POSITION, NotAssessed.AGE)


class Outside(str, enum.Enum):
    DECLINE = "decline"   # no finding: the image is not scored (a study of such images: "not analysed" SR)
    FLAG = "flag"         # scored as usual, the result marked with the reasons


@dataclass(frozen=True)
class IntendedUse:
    """Allowed values (upper case; empty = no check) and the age range in years (None = no bound)."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    view_positions: tuple[str, ...]
    min_age_years: float | None
    max_age_years: float | None
    outside: Outside = Outside.DECLINE

    def __post_init__(self) -> None:
        for name in ("modalities", "body_parts", "view_positions"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"intended_use.{name} must be a list of non-empty strings, got {values!r}")
            object.__setattr__(self, name, tuple(v.strip().upper() for v in values))
        for name in ("min_age_years", "max_age_years"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ValueError(f"intended_use.{name} must be a number >= 0 or None, got {value!r}")
        if (self.min_age_years is not None and self.max_age_years is not None
                and self.min_age_years > self.max_age_years):
            raise ValueError(f"intended_use.min_age_years {self.min_age_years} > max_age_years {self.max_age_years}")
        object.__setattr__(self, "outside", Outside(self.outside))

    @classmethod
    def resolve(cls, site: Mapping[str, Any], model: Mapping[str, Any]) -> "IntendedUse":
        """The site's [intended_use] over the model's: [] / a negative age = the model's; ["*"] = any."""
        model = dict(model) if model else dict(LEGACY_USE)

        def values(key: str) -> tuple[str, ...]:
            chosen = list(site.get(key) or model.get(key) or [])
            return () if ANY in chosen else tuple(chosen)

        def age(key: str) -> float | None:
            value = site.get(key, -1)
            if value is not None and value >= 0:
                return float(value)
            stated = model.get(key)
            return float(stated) if stated is not None else None

        return cls(values("modalities"), values("body_parts"), values("view_positions"),
                   age("min_age_years"), age("max_age_years"), Outside(site.get("outside", "decline")))

    def describe(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "body_parts": list(self.body_parts),
                "view_positions": list(self.view_positions), "min_age_years": self.min_age_years,
                "max_age_years": self.max_age_years, "outside": self.outside.value}


_AGE = re.compile(r"^(\d{3})([DWMY])$")
_PER_YEAR = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip().rstrip("\x00").strip()


def _date(value: Any) -> date | None:
    text = _text(value)
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_in_years(attributes: Mapping[str, Any]) -> float | None:
    """PatientAge (nnnD/W/M/Y), else PatientBirthDate to StudyDate / AcquisitionDate / ContentDate; None = unknown."""
    match = _AGE.match(_text(attributes.get("PatientAge")))
    if match:
        return int(match.group(1)) / _PER_YEAR[match.group(2)]
    born = _date(attributes.get("PatientBirthDate"))
    if born is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate"):
        taken = _date(attributes.get(keyword))
        if taken is not None and taken >= born:
            return (taken - born).days / 365.25
    return None


def check_header(attributes: Mapping[str, Any], use: IntendedUse) -> list[tuple[NotAssessed, str]]:
    """Every way the header lies outside ``use``: [(code, detail)]; [] = inside (or unknown).

    ``attributes``: a pydicom Dataset or any mapping of keyword -> value. Ages are compared in
    completed years, both ends inclusive (max 5 admits a child of 5 years and 11 months).
    """
    outside: list[tuple[NotAssessed, str]] = []
    for code, keyword, allowed in ((NotAssessed.MODALITY, "Modality", use.modalities),
                                   (NotAssessed.BODY_PART, "BodyPartExamined", use.body_parts),
                                   (NotAssessed.VIEW_POSITION, "ViewPosition", use.view_positions)):
        value = _text(attributes.get(keyword)).upper()
        if value and allowed and value not in allowed:
            outside.append((code, f"{keyword} is {value!r}, intended: {', '.join(allowed)}"))
    years = age_in_years(attributes)
    if years is not None:
        if use.min_age_years is not None and years < use.min_age_years:
            outside.append((NotAssessed.AGE, f"patient age {years:.1f} years is below {use.min_age_years:g}"))
        elif use.max_age_years is not None and math.floor(years) > use.max_age_years:
            outside.append((NotAssessed.AGE, f"patient age {years:.1f} years is above {use.max_age_years:g}"))
    return outside


def site_values(section: Any) -> dict[str, Any]:
    """worker.settings.IntendedUseSettings (or a mapping) -> the mapping IntendedUse.resolve reads."""
    if isinstance(section, Mapping):
        return dict(section)
    return {key: getattr(section, key) for key in ("modalities", "body_parts", "view_positions", "min_age_years",
                                                   "max_age_years", "outside")}



#: Reasons stored before [intended_use] existed, and the code each means now.
_LEGACY = {"not_chest": NotAssessed.BODY_PART.value, "lateral_view": NotAssessed.VIEW_POSITION.value}
_NOT_ELIGIBLE = frozenset(("wrong_sop_class", "late_arrival"))


def not_assessed_code(reason: str | None) -> str:
    """An instance's stored reason (instances.reason) as a NotAssessed code: the header and pixel
    codes as they are, the SOP class / late arrival as ``not_eligible``, every decoding reason of
    dicom_io (no_pixel_data, truncated_pixel_data, decode_failed, ...) as ``undecodable``."""
    if reason in _CODES:
        return str(reason)
    if reason in _LEGACY:
        return _LEGACY[reason]
    return NotAssessed.NOT_ELIGIBLE.value if reason in _NOT_ELIGIBLE else NotAssessed.UNDECODABLE.value


@dataclass(frozen=True)
class Assessment:
    """One image's verdict: assessed (a finding may be given), the reasons it was not, the header
    codes it was scored despite (outside = flag)."""

    assessed: bool
    reasons: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


def assess(header_outside: list[tuple[NotAssessed, str]], in_distribution: bool | None, scored: bool,
           use: IntendedUse) -> Assessment:
    """Combine the header checks, the pixel check (None = no detector) and decoding into a verdict.

    The pixel check always declines (an image unlike the training films gets no finding whatever the
    site's ``outside``); the header checks decline or flag as ``use.outside`` says.
    """
    reasons: list[str] = []
    flags: list[str] = []
    for code, _ in header_outside:
        (reasons if use.outside is Outside.DECLINE else flags).append(code.value)
    if not scored:
        reasons.append(NotAssessed.UNDECODABLE.value)
    elif in_distribution is False:
        reasons.append(NotAssessed.OUT_OF_DISTRIBUTION.value)
    unique = tuple(dict.fromkeys(reasons))
    return Assessment(not unique, unique, tuple(dict.fromkeys(flags)))
