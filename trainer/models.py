"""The model zoo: the seed's SimpleCNN and a 1-channel ResNet18 (both output one logit), and where
they run fast (cpu_supports_bf16: the trainer's and the worker's "auto" precision ask it)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

ARCHITECTURES = ("simplecnn", "resnet18")


class SimpleCNN(nn.Module):
    """The seed's baseline: three conv blocks (16/32/64), FC 512, dropout 0.5, one logit."""

    def __init__(self, input_size: int = 224) -> None:
        super().__init__()
        blocks = []
        channels = [1, 16, 32, 64]
        for c_in, c_out in zip(channels, channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        side = input_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18_1ch() -> nn.Module:
    """torchvision's ResNet18 (random init) with a 1-channel stem and a single-logit head."""
    model = resnet18(weights=None, num_classes=1)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def cpu_supports_bf16() -> bool:
    """bf16 autocast only pays off on CPUs with native bf16 (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_model(arch: str, input_size: int = 224) -> nn.Module:
    """Instantiate an architecture by name (see ARCHITECTURES)."""
    if arch == "simplecnn":
        return SimpleCNN(input_size)
    if arch == "resnet18":
        return resnet18_1ch()
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
