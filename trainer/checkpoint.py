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

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "ModelInfo", "load_checkpoint", "new_model_uid", "read_model_info",
           "save_checkpoint"]


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
