"""Where the model looked, as pictures and DICOM objects a viewer shows.

The map itself is trainer/cam.py (HiResCAM, computed in the scoring forward pass); its geometry
back on the source image is dicom_io.map_to_image. This package turns a map (float32 in [0, 1] at
the source's rows x columns) into:
  overlay.py       the colour blend, legend and burned-in text (numpy + Pillow): ``key_picture``,
                   shared by the key image, ``classify --heatmap`` (``write_png``) and the web page's picture (``jpeg_bytes``)
  region.py        the strongest region as a closed POLYGON in SCOORD image coordinates (the SR's
                   spatial coordinate): ``strongest_region``
  segmentation.py  the quantitative map: a fractional DICOM Segmentation (highdicom ``seg``):
                   ``build_segmentation``; the objects' UIDs ``heatmap_uids``; Part 10 bytes ``encode``
  key_image.py     the displayable picture: an RGB Secondary Capture (highdicom ``sc``): ``build_key_image``
All of them work from the source's header alone (worker.sr.source_dataset). No torch, no database,
no pynetdicom here (pyproject [tool.importlinter]). worker.heatmap imports worker.sr (derived_uid,
the PNEUMONIA code), so worker.sr must not import worker.heatmap.
"""

from .key_image import build_key_image
from .overlay import blend, colourise, jpeg_bytes, key_picture, png_bytes, write_png
from .region import strongest_region
from .segmentation import HeatmapKind, build_segmentation, encode, heatmap_uids

__all__ = [
    "HeatmapKind", "blend", "build_key_image", "build_segmentation", "colourise", "encode", "heatmap_uids",
    "jpeg_bytes", "key_picture", "png_bytes", "strongest_region", "write_png",
]
