"""What a checkpoint says about its model, readable without torch.

The worker names the model in every SR (its UID, name, version, threshold) and checks that it was
trained on dicom_io's model input; none of that needs the weights. So the metadata lives here, on
numpy and the safetensors header alone: ``import worker.sr`` does not load torch (4-5 s).
trainer/checkpoint.py writes and loads whole checkpoints and re-exports these names.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from dicom_io.model_input import INPUT_SIZE, NORM_MEAN, NORM_STD

#: 2: intended_use, calibration and ood (with the ``ood.*`` tensors); format 1 files still load.
FORMAT_VERSION = 2
METADATA_KEY = "cxr_model"
#: What the shipped training population was (config/train.toml [intended_use] writes it into new
#: checkpoints; the Kaggle set: paediatric AP chest films, children aged 1-5, one centre).
INTENDED_USE_KEYS = ("modalities", "body_parts", "view_positions", "min_age_years", "max_age_years")
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
    #: modalities / body_parts / view_positions (lists of DICOM code strings), min_age_years /
    #: max_age_years (the training population); empty = not stated (format 1 checkpoints).
    intended_use: dict[str, Any] = field(default_factory=dict)
    #: trainer/ood.py Calibration as a dict (scale, bias, method); empty = uncalibrated (identity).
    calibration: dict[str, Any] = field(default_factory=dict)
    #: the out-of-distribution detector's metadata (method, threshold, target_rejection, validation
    #: rates); its tensors are ``ood.*`` in the same file. Empty = no detector.
    ood: dict[str, Any] = field(default_factory=dict)

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
        unknown = set(self.intended_use) - set(INTENDED_USE_KEYS)
        if unknown:
            raise ValueError(f"intended_use has unknown keys {sorted(unknown)}")
        if self.calibration and not float(self.calibration.get("scale", 0)) > 0:
            raise ValueError(f"calibration scale must be > 0, got {self.calibration}")
        if self.ood and not float(self.ood.get("threshold", 0)) > 0:
            raise ValueError(f"ood threshold must be > 0, got {self.ood}")

    @property
    def positive_class(self) -> str:
        return self.class_names[1]

    @property
    def has_detector(self) -> bool:
        return bool(self.ood)

    @property
    def ood_threshold(self) -> float | None:
        return float(self.ood["threshold"]) if self.ood else None

    def calibrate(self, raw_probability: float) -> float:
        """A raw probability on the calibrated scale: sigmoid(scale * logit + bias) (identity when uncalibrated)."""
        if not self.calibration:
            return float(raw_probability)
        p = min(max(float(raw_probability), 1e-12), 1 - 1e-12)
        z = float(self.calibration["scale"]) * math.log(p / (1 - p)) + float(self.calibration["bias"])
        return 0.5 * (1.0 + math.tanh(0.5 * z))

    @property
    def calibrated_threshold(self) -> float:
        """The decision threshold on the calibrated scale: the same decisions as ``threshold`` on raw ones."""
        return self.calibrate(self.threshold)


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
