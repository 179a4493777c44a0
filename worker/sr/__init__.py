"""The result as DICOM: a Comprehensive 3D SR (TID 1500) built, encoded and read back.

Public face (callers import from here only):
  ``PneumoniaReport``       what one SR says and where it goes, checked once (report.py); with
                            ``DeclinedImage`` items and no assessed image: the "not analysed" SR;
                            ``HeatmapEvidence`` items (region, probability, ``ReferencedObject`` SEG
                            and key image) for the mapped images: TID 1410 groups (builder.py)
  ``sr_uids``               the SR's series and instance UIDs, derived from (study, model, revision)
  ``build_pneumonia_sr``    the SR as a pydicom data set, built by highdicom (builder.py)
  ``encode_pneumonia_sr``   its Part 10 bytes through the per-shape byte template (template.py)
  ``read_pneumonia_sr``     the values back (reader.py)
  ``PNEUMONIA``, ``CERTAINTY_OF_FINDING``, ...: the codes and texts the SR is written with
  ``SOURCE_TAGS``, ``pack_source``, ``source_dataset``: what the SR reads from a source image, kept
                            at receive time so the SR needs no second parse of the file (sources.py)
The template builds on the builder, never the reverse; every reliance on highdicom's internals is
in _highdicom.py, whose version gate runs on the first import of this package.
"""

from .builder import (
    CERTAINTY_OF_FINDING,
    PNEUMONIA,
    PROCESSING_EQUIPMENT,
    SR_SERIES_DESCRIPTION,
    build_pneumonia_sr,
    sr_file_bytes,
)
from ._highdicom import acquisition_equipment
from .reader import read_pneumonia_sr
from .report import DeclinedImage, HeatmapEvidence, PneumoniaReport, ReferencedObject, derived_uid, sr_uids
from .sources import SOURCE_TAGS, pack_source, source_dataset, unpack_source
from .template import clear_template_cache, encode_pneumonia_sr, template_cache_info

__all__ = [
    "CERTAINTY_OF_FINDING", "DeclinedImage", "HeatmapEvidence", "PNEUMONIA", "PROCESSING_EQUIPMENT", "PneumoniaReport",
    "ReferencedObject", "SR_SERIES_DESCRIPTION",
    "SOURCE_TAGS", "build_pneumonia_sr", "clear_template_cache", "encode_pneumonia_sr",
    "acquisition_equipment", "derived_uid", "pack_source", "read_pneumonia_sr", "source_dataset", "sr_file_bytes", "sr_uids", "template_cache_info",
    "unpack_source",
]
