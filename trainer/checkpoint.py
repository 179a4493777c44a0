"""Checkpoint format: one safetensors file, weights plus JSON metadata in its header.

safetensors cannot hold code or pickles, so loading a checkpoint never executes anything. The
metadata says everything the worker needs to score exactly as the model was trained; it is
described, and read without torch, in trainer/model_info.py (whose names this module re-exports).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .model_info import FORMAT_VERSION, METADATA_KEY, ModelInfo, new_model_uid, read_model_info
from .models import build_model
from .ood import MEANS_KEY, OOD_PREFIX, PRECISION_KEY, MahalanobisDetector

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "ModelInfo", "load_checkpoint", "load_detector", "new_model_uid",
           "read_model_info", "rewrite_checkpoint", "save_checkpoint"]


def _write(state: dict[str, torch.Tensor], info: ModelInfo, path: Path,
           detector: MahalanobisDetector | None) -> Path:
    if bool(detector) != info.has_detector:
        raise ValueError("ModelInfo.ood and the detector tensors must be given together")
    if detector is not None:
        state = {**state, **{k: v.detach().to("cpu").float().contiguous() for k, v in detector.tensors().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(asdict(info), sort_keys=True)})
    tmp.replace(path)
    return path


def save_checkpoint(model: nn.Module, info: ModelInfo, path: str | Path, half: bool = False,
                    detector: MahalanobisDetector | None = None) -> Path:
    """Write weights (optionally fp16, to keep shipped files small), the detector's fp32 tensors
    (``ood.*``, when ``info.ood`` names one) and metadata atomically."""
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor
    return _write(state, info, Path(path), detector)


def rewrite_checkpoint(source: str | Path, info: ModelInfo, path: str | Path,
                       detector: MahalanobisDetector | None = None) -> Path:
    """The weights of ``source`` exactly as stored (same bytes, same dtype), with new metadata and detector."""
    with safe_open(str(source), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(OOD_PREFIX)}
    return _write(state, info, Path(path), detector)


def load_detector(path: str | Path, info: ModelInfo | None = None) -> MahalanobisDetector | None:
    """The checkpoint's out-of-distribution detector, or None when it has none (format 1 files)."""
    info = info or read_model_info(path)
    if not info.has_detector:
        return None
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if not {MEANS_KEY, PRECISION_KEY} <= keys:
            raise ValueError(f"{path}: metadata names a detector but the ood.* tensors are missing")
        return MahalanobisDetector(handle.get_tensor(MEANS_KEY), handle.get_tensor(PRECISION_KEY),
                                   float(info.ood["threshold"]))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the model named in the metadata and load its weights (as fp32) in eval mode."""
    info = read_model_info(path)
    model = build_model(info.arch, info.input_size)
    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if key.startswith(OOD_PREFIX):
                continue
            tensor = handle.get_tensor(key)
            state[key] = tensor.float() if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, info
