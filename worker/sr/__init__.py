"""The result as DICOM: a Comprehensive 3D SR (TID 1500) built, encoded and read back.

Public face: ``build_pneumonia_sr`` (a pydicom data set, built by highdicom), ``encode_pneumonia_sr``
(Part 10 bytes, through the per-shape byte template), ``read_pneumonia_sr`` (the values back).
"""

from .builder import build_pneumonia_sr, encode_pneumonia_sr, sr_file_bytes
from .reader import read_pneumonia_sr

__all__ = ["build_pneumonia_sr", "encode_pneumonia_sr", "read_pneumonia_sr", "sr_file_bytes"]
