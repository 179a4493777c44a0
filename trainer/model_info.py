"""What a checkpoint says about its model, readable without torch.

The worker names the model in every SR (its UID, name, version, threshold) and checks that it was
trained on dicom_io's model input; none of that needs the weights. So the metadata lives here, on
numpy and the safetensors header alone: ``import worker.sr`` does not load torch (4-5 s).
trainer/checkpoint.py writes and loads whole checkpoints and re-exports these names.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from dicom_io.model_input import INPUT_SIZE, NORM_MEAN, NORM_STD

FORMAT_VERSION = 1
METADATA_KEY = "cxr_model"
#: The architectures a checkpoint may name; trainer/models.py's zoo builds each of them
#: (tests/trainer/test_model_info.py checks that the two lists agree).
ARCHITECTURES = ("simplecnn", "resnet18")


@dataclass
class ModelInfo:
    """Metadata carried by a checkpoint; validated at construction."""

    arch: str
    name: str
    version: str
    threshold: float
    uid: str
    input_size: int = INPUT_SIZE
    norm_mean: float = NORM_MEAN
    norm_std: float = NORM_STD
    class_names: list[str] = field(default_factory=lambda: ["NORMAL", "PNEUMONIA"])
    data_fingerprint: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    threshold_rule: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
        if not self.uid or not all(part.isdigit() for part in self.uid.split(".")) or len(self.uid) > 64:
            raise ValueError(f"model UID {self.uid!r} is not a valid DICOM UID")
        if len(self.class_names) != 2:
            raise ValueError("exactly two class names expected (negative, positive)")
        if self.input_size != INPUT_SIZE or self.norm_mean != NORM_MEAN or self.norm_std != NORM_STD:
            raise ValueError("checkpoint input/normalisation differs from dicom_io's model input")

    @property
    def positive_class(self) -> str:
        return self.class_names[1]


def new_model_uid() -> str:
    """A DICOM UID for a newly trained model (becomes the SR's Device Observer UID)."""
    return f"2.25.{uuid.uuid4().int}"


def read_model_info(path: str | Path) -> ModelInfo:
    """Read only the metadata of a checkpoint (the safetensors header; no tensor is loaded)."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a cxr-worker checkpoint (no {METADATA_KEY!r} metadata)")
    raw = json.loads(metadata[METADATA_KEY])
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} uses checkpoint format {raw['format_version']}, newer than this software")
    return ModelInfo(**raw)
