"""Devices, precision, distributed setup and batched inference shared by training and evaluation."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dicom_io.model_input import normalize_values

from .models import cpu_supports_bf16


@dataclass
class Runtime:
    """Where this process runs: device, autocast dtype, and its place in a distributed job."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(amp: str = "auto") -> Runtime:
    """Pick CUDA if present, join a torchrun job if launched by one, and choose the precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        if world_size > 1:  # share the cores between the processes on this node
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp_dtype = None
    if amp == "auto":
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif cpu_supports_bf16():
            amp_dtype = torch.bfloat16
    elif amp != "off":
        raise ValueError("amp must be 'auto' or 'off'")
    return Runtime(device, amp_dtype, rank, world_size)


def to_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) on any device -> normalised float32, by dicom_io's one formula."""
    return normalize_values(batch_u8.float())


def iterate_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def predict_logits(model: nn.Module, images_u8: np.ndarray, runtime: Runtime, batch_size: int = 64) -> np.ndarray:
    """Logits for uint8 images (N, H, W), in batches, without augmentation."""
    model.eval()
    out = []
    tensor = torch.from_numpy(images_u8)
    for part in iterate_batches(len(tensor), batch_size):
        batch = tensor[part].unsqueeze(1).to(runtime.device, non_blocking=True)
        x = to_input(batch).contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(x)
        out.append(logits.float().squeeze(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))
