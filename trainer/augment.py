"""Batch augmentation on the device: small affine moves and exposure changes, as radiographs vary.

No flips: a chest film has a left and a right (heart, stomach bubble), and a mirrored film is not
a plausible input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random changes; values come from config/train.toml [augment]."""

    rotate_degrees: float
    scale: float
    translate: float
    brightness: float
    contrast: float


def augment(x: torch.Tensor, settings: AugmentSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly move and re-expose a normalised float batch (N, 1, H, W) in [-1, 1]."""
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(settings.rotate_degrees))
    scale = 1.0 + uniform(settings.scale)
    tx, ty = uniform(settings.translate * 2), uniform(settings.translate * 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the image minimum (-1 = black), like collimated film edges.
    moved = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    brightness = uniform(settings.brightness).to(x.device, x.dtype).view(n, 1, 1, 1)
    contrast = (1.0 + uniform(settings.contrast)).to(x.device, x.dtype).view(n, 1, 1, 1)
    mean = moved.mean(dim=(2, 3), keepdim=True)
    return ((moved - mean) * contrast + mean + 2 * brightness).clamp(-1.0, 1.0)
