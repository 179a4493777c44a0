"""Class-activation maps of the model zoo's one-logit models: where the pneumonia logit came from.

HiResCAM (Draelos & Carin, 2020): the element-wise product of the last convolutional block's
activations A (N, K, h, w) and the gradient of the logit with respect to them, summed over the K
channels. Unlike Grad-CAM, which first averages the gradient over space, HiResCAM is exact for the
model it explains: for a head that is global average pooling followed by one linear layer (ResNet18)
the gradient is w_k / (h w) everywhere, and the map is

    cam[y, x] = sum_k w_k A[k, y, x] / (h w),      sum_{y,x} cam[y, x] + b = logit

i.e. each cell's share of the logit (where Grad-CAM and CAM coincide with it, up to scale). That
closed form needs no backward pass: ``CamTap`` reads A with a forward hook in the same forward pass
that scores the image (benchmarks/bench_model.py, CAM line). Models without such a head (the seed's
SimpleCNN: flatten + two linear layers) get ``hirescam``, the same definition through autograd.

``relevance`` turns a map into what is displayed and stored: the positive evidence (ReLU), scaled to
its own maximum, so the colours are relative within one image (docs/heatmaps.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: ResNet18's ``layer4`` (512 x 7 x 7 at 224), SimpleCNN's ``features``."""
    for name in ("layer4", "features"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(f"no known last convolutional block in {type(model).__name__}")


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The one-logit linear layer read after global average pooling of ``target_layer``, or None
    when the model's head is anything else (then only ``hirescam`` applies)."""
    fc, pool = getattr(model, "fc", None), getattr(model, "avgpool", None)
    if isinstance(fc, nn.Linear) and fc.out_features == 1 and isinstance(pool, nn.AdaptiveAvgPool2d) \
            and pool.output_size in (1, (1, 1)) and hasattr(model, "layer4"):
        return fc
    return None


class CamTap:
    """HiResCAM in closed form from the forward pass that scores the batch (a forward hook on
    ``target_layer``); only for models with a ``linear_head``."""

    def __init__(self, model: nn.Module) -> None:
        head = linear_head(model)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no pooled linear head; use hirescam()")
        self._head = head
        self._activations: torch.Tensor | None = None
        self._handle = target_layer(model).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _args, output: torch.Tensor) -> None:
        self._activations = output.detach()

    def take(self) -> torch.Tensor:
        """The maps (N, h, w) float32 of the latest forward pass (once)."""
        if self._activations is None:
            raise RuntimeError("no forward pass since the last take()")
        a, self._activations = self._activations.float(), None
        weight = self._head.weight.detach().float().reshape(-1)
        return torch.einsum("nkhw,k->nhw", a, weight) / (a.shape[-1] * a.shape[-2])

    def remove(self) -> None:
        self._handle.remove()


def hirescam(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HiResCAM through autograd: (maps (N, h, w) float32, logits (N,)). Any one-logit model of the
    zoo; each image's logit depends on its own input only, so one backward pass serves the batch."""
    kept: list[torch.Tensor] = []

    def keep(_module, _args, output):
        output.retain_grad()
        kept.append(output)

    handle = target_layer(model).register_forward_hook(keep)
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            logits = model(x.detach().clone().requires_grad_(True)).reshape(-1)
            logits.sum().backward()
    finally:
        handle.remove()
    a = kept[-1]
    cam = (a.grad * a).sum(dim=1).detach().float()
    model.zero_grad(set_to_none=True)
    return cam, logits.detach().float()


def relevance(cam: np.ndarray) -> np.ndarray:
    """A map (..., h, w) -> float32 in [0, 1]: its positive part over its own maximum (all zeros when
    nothing in the image speaks for the finding)."""
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    top = cam.max(axis=(-2, -1), keepdims=True)
    return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)
