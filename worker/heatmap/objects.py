"""The heatmap objects of one assessed image, from its map: what the scorer writes and sends.

The scorer hands over an ``ImageMap`` (the source's header as kept at receive time, the map's
relevance over the model input, the decoded image's geometry and its shrunk display copy); ``make``
returns the encoded DICOM objects (settings ``heatmap.objects``: the fractional Segmentation at the
source's own rows x columns, the RGB key image), the overlay as JPEG for the web page, and the
``HeatmapEvidence`` the SR references them by, with the strongest region as its spatial coordinate.
UIDs come from (study, model, revision, source image, object kind) (``heatmap_uids``): a retry
rewrites the same objects, a re-score (the next revision) makes new ones beside the new SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, SegmentationStorage

from trainer.model_info import ModelInfo

from ..settings import HeatmapObject, HeatmapSettings
from ..store.files import ObjectPaths, write_files
from ..sr import HeatmapEvidence, ReferencedObject
from .key_image import encode_key_image
from .overlay import jpeg_bytes, key_picture
from .region import strongest_region
from .segmentation import (
    HeatmapKind, encode_segmentation, heatmap_uids, highdicom_source, map_levels,
)


@dataclass(frozen=True)
class ImageMap:
    """One assessed image and its map, as the scorer has them."""

    source: pydicom.Dataset             # the header (worker.sr.source_dataset of the kept attributes)
    relevance: np.ndarray               # float32 (h, w) in [0, 1] over the model input (trainer.cam.relevance)
    image_shape: tuple[int, int]        # (rows, columns) of the decoded frame
    preview: np.ndarray | None          # uint8 display image (shrunk towards heatmap.key_image_size), or None
    probability: float                  # the image's calibrated probability
    label: str                          # its decision (the model's class name)
    frame: int | None = None            # 0-based frame of a multi-frame source (Prepared.frame)
    preview_path: Path | None = None    # the preview's .npy file instead (a decode process kept it there)

    def display(self) -> np.ndarray | None:
        """The preview, read from its file where a decode process kept it (Prepared.preview_path)."""
        if self.preview is not None or self.preview_path is None:
            return self.preview
        return np.load(self.preview_path, allow_pickle=False)


@dataclass
class MadeFile:
    """One encoded heatmap object: its bytes, or (once make_all wrote it) the file they are in."""

    kind: str                           # a HeatmapObject value
    sop_instance_uid: str
    data: bytes | None = None
    path: Path | None = None


@dataclass
class MadeObjects:
    """What ``make`` produced for one image."""

    files: list[MadeFile] = field(default_factory=list)
    page: bytes | None = None           # the overlay for the web page, JPEG (heatmaps/<study>/<sop>.jpg)
    page_path: Path | None = None       # where make_all wrote it
    evidence: HeatmapEvidence | None = None


def make(m: ImageMap, settings: HeatmapSettings, *, study_uid: str, revision: int, model: ModelInfo,
         threshold: float, manufacturer: str) -> MadeObjects | None:
    """Encode the objects of ``settings.objects`` for ``m`` (see the module docstring); None when the
    map has no positive value (nothing in the image spoke for the finding: no region to show)."""
    if not float(np.max(m.relevance)) > 0.0:
        return None
    rows, cols = m.image_shape
    full = map_levels(m.relevance, rows, cols)  # the source's own geometry (the 224 squash undone), as SEG levels
    source_uid = str(m.source.SOPInstanceUID)
    frame = None if m.frame is None else m.frame + 1  # DICOM frame numbers are 1-based
    made = MadeObjects()
    references: dict[str, ReferencedObject] = {}
    header = highdicom_source(m.source)  # the source as highdicom reads it, once for both objects
    if HeatmapObject.SEGMENTATION in settings.objects:
        series_uid, instance_uid = heatmap_uids(study_uid, model.uid, revision, source_uid, HeatmapKind.SEGMENTATION)
        data = encode_segmentation(m.source, full, model=model, series_uid=series_uid, instance_uid=instance_uid,
                                   series_number=settings.segmentation_series_number, instance_number=revision,
                                   manufacturer=manufacturer, frame=frame, header=header,
                                   transfer_syntax_uid=RLELossless if settings.segmentation_compression == "rle"
                                   else ExplicitVRLittleEndian)
        made.files.append(MadeFile(HeatmapObject.SEGMENTATION, instance_uid, data))
        references["segmentation"] = ReferencedObject(SegmentationStorage, instance_uid, series_uid,
                                                         int(header.Rows), int(header.Columns))
    preview = m.display()
    if preview is not None:
        # the picture blends the map resized to it: the model-input grid is enough (and cheapest)
        picture = key_picture(preview, m.relevance, finding=m.label, probability=m.probability,
                              threshold=threshold, model_name=model.name, model_version=model.version,
                              size=settings.key_image_size)
        if HeatmapObject.KEY_IMAGE in settings.objects:
            series_uid, instance_uid = heatmap_uids(study_uid, model.uid, revision, source_uid, HeatmapKind.KEY_IMAGE)
            data, made.page = encode_key_image(m.source, picture, model=model, series_uid=series_uid,
                                               instance_uid=instance_uid, series_number=settings.key_image_series_number,
                                               instance_number=revision, manufacturer=manufacturer, frame=frame,
                                               header=header)
            made.files.append(MadeFile(HeatmapObject.KEY_IMAGE, instance_uid, data))
            references["key_image"] = ReferencedObject(SecondaryCaptureImageStorage, instance_uid, series_uid,
                                                       int(picture.shape[0]), int(picture.shape[1]))
            # the page shows the key image's own JPEG frame: the same pixels, no second encode
        else:
            made.page = jpeg_bytes(picture)  # PNG costs ~35 ms at 1024 px, JPEG ~3 ms
    made.evidence = HeatmapEvidence(source=m.source, region=strongest_region(full), probability=m.probability,
                                    **references)
    return made


def make_all(maps: list[ImageMap], settings: HeatmapSettings, study_uid: str, revision: int, model: ModelInfo,
             threshold: float, manufacturer: str, paths: ObjectPaths | None = None) -> list[MadeObjects | None]:
    """``make`` for each image of one study (a picklable top-level function: the scorer runs it in a
    decode process, ModelRunner.submit_beside). With ``paths``, the objects and the page's JPEGs are
    written there in one durable batch (worker.store.files.write_files) and come back as paths: the
    megabytes of a SEG stay in the process that made them instead of crossing a pipe to the main
    process (whose threads wait for its GIL at every 64 KB of a pipe read)."""
    made = [make(m, settings, study_uid=study_uid, revision=revision, model=model, threshold=threshold,
                 manufacturer=manufacturer) for m in maps]
    if paths is None:
        return made
    writes: list[tuple[Path, bytes]] = []
    for m, objects in zip(maps, made):
        if objects is None:
            continue
        for item in objects.files:
            item.path = paths.sr_path(study_uid, item.sop_instance_uid)
            writes.append((item.path, item.data))
            item.data = None
        if objects.page is not None:
            objects.page_path = paths.heatmap_path(study_uid, str(m.source.SOPInstanceUID))
            writes.append((objects.page_path, objects.page))
            objects.page = None
    if writes:
        write_files(writes)
    return made


def warm_up(_: object = None) -> bool:
    """In a decode process at start-up: the one-off costs of the first heatmap (highdicom's standard
    tables, ~0.3 s, read on its first SEG and SC; the colour tables, the fonts) before the first study
    pays them: one SEG and one key image of a 16 x 16 stand-in source, then forgotten."""
    from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

    from .key_image import clear_key_image_templates
    from .segmentation import clear_segmentation_templates

    source = pydicom.Dataset()
    source.SOPClassUID, source.SOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
    source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
    source.Rows = source.Columns = 16
    source.Modality, source.PatientID = "CR", "WARM-UP"
    model = ModelInfo(arch="resnet18", name="warm-up", version="0", threshold=0.5, uid=generate_uid())
    picture = key_picture(np.zeros((16, 16), np.uint8), np.ones((7, 7), np.float32), finding="PNEUMONIA",
                          probability=0.5, threshold=0.5, model_name="warm-up", model_version="0")
    uids = dict(series_uid=generate_uid(), instance_uid=generate_uid(), series_number=1, instance_number=1,
                manufacturer="warm-up")
    encode_segmentation(source, map_levels(np.ones((7, 7), np.float32), 16, 16), model=model,
                        transfer_syntax_uid=RLELossless, **uids)
    encode_key_image(source, picture, model=model, **uids)
    clear_segmentation_templates()
    clear_key_image_templates()
    return True
