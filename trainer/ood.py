"""The out-of-distribution detector and the calibrator: the maths the trainer fits and the worker runs.

Detector: the Mahalanobis distance of an image's penultimate features (the 512 values the last
linear layer reads) to the nearer class mean of the training split, with one covariance shared by
both classes, shrunk by Ledoit-Wolf (scikit-learn; Lee et al., NeurIPS 2018). Higher = more unusual.
Its tensors travel in the checkpoint (``ood.means`` (2, D), ``ood.precision`` (D, D), fp32) and its
metadata (method, threshold, validation rates) in ModelInfo.ood; the threshold is the validation
quantile at a fixed in-distribution rejection rate.

Calibrator: logistic calibration of the model's logit, p = sigmoid(scale * logit + bias), fitted on
validation by maximum likelihood (Platt scaling; temperature scaling is the case bias = 0). The
decision threshold is mapped through the same monotone function, so no decision changes.

The worker reads the features in the same forward pass as the logit: ``FeatureTap`` is a forward
pre-hook on the last linear layer (about 0.1 ms per image for the distance, see benchmarks/bench_model.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Tensor names of the detector inside a checkpoint (everything else is the model's state dict).
OOD_PREFIX = "ood."
MEANS_KEY = OOD_PREFIX + "means"
PRECISION_KEY = OOD_PREFIX + "precision"
METHODS = ("mahalanobis",)
CALIBRATION_METHODS = ("platt", "temperature")


def last_linear(model: nn.Module) -> nn.Linear:
    """The layer whose input is the penultimate feature vector (ResNet18 ``fc``, SimpleCNN's last Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no linear layer to read features from")
    return linears[-1]


class FeatureTap:
    """Keeps the input of the model's last linear layer from the latest forward pass (a pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self._layer = last_linear(model)
        self._handle = None
        self.attach()

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self._layer.register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.features = args[0].detach()

    def take(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no forward pass since the last take()")
        features, self.features = self.features, None
        return features.float().reshape(features.shape[0], -1)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class MahalanobisDetector:
    """Class means (C, D) and the shared precision matrix (D, D); ``threshold`` on the distance."""

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float

    def __post_init__(self) -> None:
        if self.means.ndim != 2 or self.precision.shape != (self.means.shape[1],) * 2:
            raise ValueError(f"means {tuple(self.means.shape)} and precision {tuple(self.precision.shape)} disagree")
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"threshold must be a positive number, got {self.threshold}")
        self.means = self.means.float()
        self.precision = self.precision.float()

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, threshold: float = 1.0) -> "MahalanobisDetector":
        """Class means and a Ledoit-Wolf shrunk covariance of the class-centred training features."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(torch.from_numpy(means).float(), torch.from_numpy(precision).float(), threshold)

    def to(self, device: torch.device) -> "MahalanobisDetector":
        return MahalanobisDetector(self.means.to(device), self.precision.to(device), self.threshold)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) distances to the nearer class mean (fp32)."""
        n, classes = features.shape[0], self.means.shape[0]
        diff = (features.float().unsqueeze(1) - self.means.unsqueeze(0)).reshape(n * classes, -1)  # (N*C, D)
        squared = ((diff @ self.precision) * diff).sum(dim=1).reshape(n, classes)
        return squared.clamp_min(0).min(dim=1).values.sqrt()

    def score_numpy(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.score(torch.from_numpy(np.asarray(features, dtype=np.float32))).numpy().astype(np.float64)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {MEANS_KEY: self.means.contiguous(), PRECISION_KEY: self.precision.contiguous()}


def energy_score(logits: np.ndarray) -> np.ndarray:
    """The energy score of a one-logit model (logits [0, z]): -E = logsumexp(0, z); returned as E
    (higher = more unusual), the alternative compared in fit-ood (Liu et al., NeurIPS 2020)."""
    return -np.logaddexp(0.0, np.asarray(logits, dtype=np.float64))


def knn_score(train_features: np.ndarray, features: np.ndarray, k: int = 10) -> np.ndarray:
    """Distance to the k-th nearest training feature after L2 normalisation (Sun et al., ICML 2022)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    bank = torch.from_numpy(unit(train_features))
    query = torch.from_numpy(unit(features))
    distances = torch.cdist(query, bank)
    return distances.kthvalue(min(k, bank.shape[0]), dim=1).values.numpy().astype(np.float64)


# --- calibration ---------------------------------------------------------------------------------

def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "platt") -> dict[str, Any]:
    """Maximum-likelihood logistic calibration of validation logits ('temperature': bias fixed at 0),
    as ModelInfo.calibration (which applies it: ModelInfo.calibrate)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def nll(params: np.ndarray) -> float:
        scale, bias = (params[0], params[1]) if method == "platt" else (params[0], 0.0)
        t = scale * z + bias
        return float(np.mean(np.logaddexp(0.0, t) - y * t))

    start = np.array([1.0, 0.0] if method == "platt" else [1.0])
    bounds = [(1e-3, 100.0), (-50.0, 50.0)] if method == "platt" else [(1e-3, 100.0)]
    found = minimize(nll, start, bounds=bounds, method="L-BFGS-B")
    scale = float(found.x[0])
    bias = float(found.x[1]) if method == "platt" else 0.0
    return {"method": method, "scale": scale, "bias": bias}


def calibrate_logits(calibration: dict[str, Any], logits: np.ndarray) -> np.ndarray:
    """Vectorised ModelInfo.calibrate on logits (the same formula; tests check they agree)."""
    if not calibration:
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    z = float(calibration["scale"]) * np.asarray(logits, dtype=np.float64) + float(calibration["bias"])
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width bins: the bin-size-weighted mean |observed fraction - mean probability|."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() * abs(labels[inside].mean() - probs[inside].mean())
    return float(total / max(1, len(labels)))
