"""What one pneumonia SR says and where it goes: the arguments of build_pneumonia_sr and
encode_pneumonia_sr, written (and checked) once.

The finding (probability, decision), its evidence (the source images of one study), the observer
(the model) and the document's own identity (series and instance UIDs and numbers, the producing
equipment). Checked at construction, each check naming its argument as highdicom's constructors do,
so both SR paths start from the same validated values.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
import pydicom

from trainer.model_info import ModelInfo


def _package_version() -> str:
    try:
        return metadata.version("cxr-worker")
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "0.0.0"


PACKAGE_VERSION = _package_version()
DEFAULT_SERIES_NUMBER = 9901
TRACKING_UID_ROOT = "2.25."
_REQUIRED_SOURCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
                             "Columns")
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


@dataclass(frozen=True)
class DeclinedImage:
    """An image of the study that got no finding: its header, the reason codes
    (worker/scoring/intended_use.NotAssessed values) and its out-of-distribution score if it was scored."""

    source: pydicom.Dataset
    reasons: tuple[str, ...]
    ood_score: float | None = None

    def __post_init__(self) -> None:
        reasons = tuple(str(r) for r in self.reasons)
        if not reasons or not all(reasons):
            raise ValueError('Argument "reasons" must hold at least one non-empty reason code.')
        object.__setattr__(self, "reasons", reasons)
        if self.ood_score is not None and not math.isfinite(float(self.ood_score)):
            raise ValueError(f'Argument "ood_score" must be a finite number, got {self.ood_score}.')


@dataclass(frozen=True)
class PneumoniaReport:
    """The content and identity of one pneumonia SR (TID 1500, one measurement group).

    `sources` are the study's assessed images (headers suffice), `probability` the model's calibrated
    output in [0, 1] (stored as Certainty of Finding in %), `positive` the thresholded decision, `model` the
    observer device and algorithm. `declined`: the study's images that got no finding, each with its
    reasons; with no assessed image at all, `sources` is empty and `probability`/`positive` are None:
    the "not analysed" SR (the algorithm ran, produced no finding, and says why). Pass `sr_series_uid`/`sr_instance_uid` (derived from the study)
    so that a retry produces the same SR instead of a duplicate; left None, new UIDs are made here.
    """

    sources: Sequence[pydicom.Dataset]
    probability: float | None
    positive: bool | None
    model: ModelInfo
    manufacturer: str = "cxr-worker"
    software_version: str = PACKAGE_VERSION
    series_number: int = DEFAULT_SERIES_NUMBER
    instance_number: int = 1
    sr_series_uid: str | None = None
    sr_instance_uid: str | None = None
    declined: Sequence[DeclinedImage] = ()
    #: the detector's threshold (None: the model has none) and the assessed image's score
    ood_threshold: float | None = None
    ood_score: float | None = None

    def __post_init__(self) -> None:
        assign = object.__setattr__  # frozen: the checked values replace the given ones once, here
        declined = tuple(self.declined)
        if not all(isinstance(d, DeclinedImage) for d in declined):
            raise TypeError('Argument "declined" must hold DeclinedImage items.')
        assign(self, "declined", declined)
        sources = tuple(self.sources)
        _checked_sources(sources + tuple(d.source for d in declined))
        assign(self, "sources", sources)
        if not sources:
            if self.probability is not None or self.positive is not None:
                raise ValueError('Arguments "probability" and "positive" must be None when no image was assessed.')
        else:
            probability = float(self.probability)
            if not 0.0 <= probability <= 1.0:  # also rejects NaN
                raise ValueError(f'Argument "probability" must lie in [0, 1], got {probability}.')
            assign(self, "probability", probability)
            assign(self, "positive", bool(self.positive))
        if not isinstance(self.model, ModelInfo):
            raise TypeError('Argument "model" must be a trainer.model_info.ModelInfo, '
                            f"got {type(self.model).__name__}.")
        for name in ("series_number", "instance_number"):
            if getattr(self, name) < 1:
                raise ValueError(f'Argument "{name}" must be positive, got {getattr(self, name)}.')
        series_uid = _checked_uid(self.sr_series_uid, "sr_series_uid") or hd.UID()
        instance_uid = _checked_uid(self.sr_instance_uid, "sr_instance_uid") or hd.UID()
        if series_uid == instance_uid:
            raise ValueError('Arguments "sr_series_uid" and "sr_instance_uid" must differ.')
        assign(self, "sr_series_uid", series_uid)
        assign(self, "sr_instance_uid", instance_uid)

    @property
    def assessed(self) -> bool:
        """True when the study has a finding (at least one assessed image)."""
        return bool(self.sources)

    @property
    def all_sources(self) -> tuple[pydicom.Dataset, ...]:
        return tuple(self.sources) + tuple(d.source for d in self.declined)

    @property
    def tracking_uid(self) -> str:
        """The measurement group's Tracking UID: derived from the SR's UID, so a retried SR carries the
        same measurement group identity."""
        return pydicom.uid.generate_uid(prefix=TRACKING_UID_ROOT, entropy_srcs=[self.sr_instance_uid, "pneumonia"])


def _checked_sources(sources: Sequence[pydicom.Dataset]) -> tuple[pydicom.Dataset, ...]:
    sources = tuple(sources)
    if not sources:
        raise ValueError('Argument "sources" must hold at least one source image.')
    for index, ds in enumerate(sources):
        missing = [kw for kw in _REQUIRED_SOURCE_KEYWORDS if not ds.get(kw)]
        if missing:
            raise ValueError(f'Argument "sources": image #{index} lacks {", ".join(missing)}.')
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f'Argument "sources": all images must belong to one study, got {len(studies)} '
                         "Study Instance UIDs.")
    instance_uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(instance_uids)) != len(instance_uids):
        raise ValueError('Argument "sources" repeats a SOP Instance UID.')
    return sources


def _checked_uid(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise ValueError(f'Argument "{name}" {value!r} is not a valid DICOM UID.')
    return str(value)


def derived_uid(*parts: str) -> str:
    """A 2.25 UID from a SHA-256 of ``parts`` (same inputs, same UID; ISO/IEC 9834-8 UUID-style root).

    (pydicom's generate_uid(prefix=None) ignores entropy_srcs and returns a random UID.)
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def sr_uids(study_uid: str, model_uid: str, revision: int) -> tuple[str, str]:
    """Deterministic (series UID, instance UID) for a study's SR: retries yield the same SR."""
    series = derived_uid("cxr-worker-sr-series", study_uid, model_uid)
    instance = derived_uid("cxr-worker-sr-instance", study_uid, model_uid, str(revision))
    return series, instance
