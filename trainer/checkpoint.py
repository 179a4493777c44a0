"""Checkpoint format: one safetensors file, weights plus JSON metadata in its header.

safetensors cannot hold code or pickles, so loading a checkpoint never executes anything. The
metadata says everything the worker needs to score exactly as the model was trained.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dicom_io.model_input import INPUT_SIZE, NORM_MEAN, NORM_STD

from .models import ARCHITECTURES, build_model

FORMAT_VERSION = 1
METADATA_KEY = "cxr_model"


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


def save_checkpoint(model: nn.Module, info: ModelInfo, path: str | Path, half: bool = False) -> Path:
    """Write weights (optionally fp16, to keep shipped files small) and metadata atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(asdict(info), sort_keys=True)})
    tmp.replace(path)
    return path


def read_model_info(path: str | Path) -> ModelInfo:
    """Read only the metadata of a checkpoint."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a cxr-worker checkpoint (no {METADATA_KEY!r} metadata)")
    raw = json.loads(metadata[METADATA_KEY])
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} uses checkpoint format {raw['format_version']}, newer than this software")
    return ModelInfo(**raw)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the model named in the metadata and load its weights (as fp32) in eval mode."""
    info = read_model_info(path)
    model = build_model(info.arch, info.input_size)
    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            state[key] = tensor.float() if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, info
