"""What one pneumonia SR says and where it goes: the arguments of build_pneumonia_sr and
encode_pneumonia_sr, written (and checked) once.

The finding (probability, decision), its evidence (the source images of one study, and per mapped
image a HeatmapEvidence: where on the image, and the heatmap objects made from it), the observer
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


#: The one frame and the one segment of a heatmap Segmentation (worker/heatmap builds it so).
SEGMENTATION_FRAME = 1
SEGMENTATION_SEGMENT = 1


@dataclass(frozen=True)
class ReferencedObject:
    """A heatmap object of the study (the Segmentation or the key image, in a new series of the same
    study, made by worker/heatmap), referenced by the SR by its UIDs only. `rows`/`columns`: the
    object's size, needed for the key image's Image Library entry (TID 1602 Pixel Data Rows/Columns)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    rows: int | None = None
    columns: int | None = None

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> ReferencedObject:
        """The reference to a heatmap object as built (a highdicom Segmentation or SCImage)."""
        return cls(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                   ds.get("Rows"), ds.get("Columns"))

    def __post_init__(self) -> None:
        for name in ("sop_class_uid", "sop_instance_uid", "series_instance_uid"):
            value = getattr(self, name)
            if not isinstance(value, str) or _checked_uid(value, name) is None:
                raise ValueError(f'Argument "{name}" {value!r} is not a valid DICOM UID.')
            object.__setattr__(self, name, str(value))
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or int(value) != value or int(value) < 1:
                    raise ValueError(f'Argument "{name}" must be a positive integer, got {value!r}.')
                object.__setattr__(self, name, int(value))


@dataclass(frozen=True)
class HeatmapEvidence:
    """Where on one assessed image the model looked, and the heatmap objects made from it.

    `source`: the image's header (one of the report's sources). `region`: the strongest region as
    DICOM SCOORD image coordinates of that image, (column, row) pairs with (0, 0) the top left corner
    of the top left pixel and (Columns, Rows) the bottom right corner of the bottom right one
    (PS3.3 C.18.6.1.1): a closed polygon (at least 4 points, the first repeated last, at least 3
    distinct) or, as a fallback, a single point. `probability`: that image's calibrated
    probability. `segmentation` (frame SEGMENTATION_FRAME, segment SEGMENTATION_SEGMENT) and
    `key_image` (with its rows and columns): the objects, if they were made.
    """

    source: pydicom.Dataset
    region: Sequence[Sequence[float]]
    probability: float
    segmentation: ReferencedObject | None = None
    key_image: ReferencedObject | None = None

    def __post_init__(self) -> None:
        assign = object.__setattr__
        if not isinstance(self.source, pydicom.Dataset):
            raise TypeError('Argument "source" must be a pydicom Dataset (the assessed image\'s header).')
        _checked_sources([self.source])
        try:
            region = tuple((float(x), float(y)) for x, y in self.region)
        except (TypeError, ValueError) as exc:
            raise ValueError(f'Argument "region" must be a sequence of (x, y) numbers: {exc}') from None
        if len(region) != 1:
            if len(region) < 4 or region[0] != region[-1]:
                raise ValueError('Argument "region" must be a closed polygon (at least 4 points, the first repeated '
                                 f"as the last) or a single point, got {len(region)} points.")
            if len(set(region)) < 3:
                raise ValueError('Argument "region" must have at least 3 distinct points.')
        columns, rows = int(self.source.Columns), int(self.source.Rows)
        for x, y in region:
            if not (math.isfinite(x) and math.isfinite(y) and 0.0 <= x <= columns and 0.0 <= y <= rows):
                raise ValueError(f'Argument "region": point ({x}, {y}) lies outside the image '
                                 f"(0..{columns} columns, 0..{rows} rows).")
        assign(self, "region", region)
        probability = float(self.probability)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f'Argument "probability" must lie in [0, 1], got {probability}.')
        assign(self, "probability", probability)
        for name in ("segmentation", "key_image"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, ReferencedObject):
                raise TypeError(f'Argument "{name}" must be a ReferencedObject or None.')
        if self.key_image is not None and (self.key_image.rows is None or self.key_image.columns is None):
            raise ValueError('Argument "key_image" must give its rows and columns (its Image Library entry).')

    @property
    def is_point(self) -> bool:
        return len(self.region) == 1

    @property
    def objects(self) -> tuple[ReferencedObject, ...]:
        return tuple(o for o in (self.segmentation, self.key_image) if o is not None)


@dataclass(frozen=True)
class PneumoniaReport:
    """The content and identity of one pneumonia SR (TID 1500, one measurement group).

    `sources` are the study's assessed images (headers suffice), `probability` the model's calibrated
    output in [0, 1] (stored as Certainty of Finding in %), `positive` the thresholded decision, `model` the
    observer device and algorithm. `declined`: the study's images that got no finding, each with its
    reasons; with no assessed image at all, `sources` is empty and `probability`/`positive` are None:
    the "not analysed" SR (the algorithm ran, produced no finding, and says why). `evidence`: one
    HeatmapEvidence per mapped assessed image (none for declined images; a key image for every item
    or for none, so that a reader can pair the Image Library's key images with the regions). Pass
    `sr_series_uid`/`sr_instance_uid` (derived from the study) so that a retry produces the same SR
    instead of a duplicate; left None, new UIDs are made here.
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
    evidence: Sequence[HeatmapEvidence] = ()

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
        assign(self, "evidence", _checked_evidence(self.evidence, sources, (series_uid, instance_uid)))

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


def _checked_evidence(evidence, sources: tuple[pydicom.Dataset, ...], own_uids: tuple[str, str]) -> tuple:
    evidence = tuple(evidence)
    if not all(isinstance(item, HeatmapEvidence) for item in evidence):
        raise TypeError('Argument "evidence" must hold HeatmapEvidence items.')
    if not evidence:
        return evidence
    assessed = [str(ds.SOPInstanceUID) for ds in sources]
    mapped = [str(item.source.SOPInstanceUID) for item in evidence]
    for uid in mapped:
        if uid not in assessed:
            raise ValueError(f'Argument "evidence": image {uid} is not one of the report\'s assessed sources.')
    if len(set(mapped)) != len(mapped):
        raise ValueError('Argument "evidence" repeats an image.')
    if len({item.key_image is None for item in evidence}) != 1:
        raise ValueError('Argument "evidence": give a key image for every item or for none.')
    taken = set(assessed) | {str(ds.SeriesInstanceUID) for ds in sources} | set(own_uids)
    objects = [o.sop_instance_uid for item in evidence for o in item.objects]
    if len(set(objects)) != len(objects) or taken & set(objects):
        raise ValueError('Argument "evidence": each heatmap object needs its own SOP Instance UID.')
    series = {o.series_instance_uid for item in evidence for o in item.objects}
    if series & (taken | set(objects)):
        raise ValueError('Argument "evidence": the heatmap objects belong in new series of the study.')
    return evidence


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
