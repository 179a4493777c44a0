"""Metrics (scikit-learn) and plots (matplotlib) from real predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)


def choose_threshold(labels: np.ndarray, probs: np.ndarray, min_sensitivity: float) -> float:
    """Highest threshold whose sensitivity is >= min_sensitivity (hence the best specificity)."""
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    # tpr and fpr only grow as the threshold falls: the first index reaching the sensitivity is
    # the highest threshold that does, and so the one with the best specificity.
    best = int(np.flatnonzero(tpr >= min_sensitivity)[0])
    # roc_curve lists thresholds as >= cut-offs; the first may be inf.
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6))


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity, PPV, NPV, confusion matrix at ``threshold``."""
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(probs) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "auc": float(roc_auc_score(labels, probs)) if both_classes else None,
        "average_precision": float(average_precision_score(labels, probs)) if both_classes else None,
        "accuracy": float((tp + tn) / len(labels)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "ppv": float(tp / (tp + fp)) if tp + fp else None,
        "npv": float(tn / (tn + fn)) if tn + fn else None,
        "brier": float(brier_score_loss(labels, probs)),
        "threshold": float(threshold),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(out_dir: str | Path, labels: np.ndarray, probs: np.ndarray, threshold: float,
             history: Sequence[dict[str, Any]] | None = None, title: str = "validation",
             *, class_names: Sequence[str]) -> list[Path]:
    """Write ROC, PR, confusion matrix, calibration (and loss curves if ``history``) as PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    if history:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        epochs = [h["epoch"] for h in history]
        ax[0].plot(epochs, [h["train_loss"] for h in history], label="train loss")
        ax[0].plot(epochs, [h["val_loss"] for h in history], label="validation loss")
        ax[0].set_xlabel("epoch"), ax[0].set_ylabel("BCE loss"), ax[0].legend(), ax[0].set_title("Loss")
        ax[1].plot(epochs, [h["val_auc"] for h in history], marker="o", color="tab:green")
        ax[1].set_xlabel("epoch"), ax[1].set_ylabel("AUC"), ax[1].set_title("Validation AUC")
        _save(fig, out / "loss_curves.png")
        written.append(out / "loss_curves.png")

    fpr, tpr, _ = roc_curve(labels, probs)
    auc = roc_auc_score(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    m = binary_metrics(labels, probs, threshold)
    ax.scatter([1 - m["specificity"]], [m["sensitivity"]], color="red", zorder=3,
               label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity"), ax.set_ylabel("sensitivity"), ax.set_title(f"ROC ({title})")
    ax.legend(loc="lower right")
    _save(fig, out / "roc.png")
    written.append(out / "roc.png")

    precision, recall, _ = precision_recall_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"AP = {average_precision_score(labels, probs):.4f}")
    ax.set_xlabel("recall (sensitivity)"), ax.set_ylabel("precision (PPV)")
    ax.set_title(f"Precision-recall ({title})"), ax.legend(loc="lower left")
    _save(fig, out / "precision_recall.png")
    written.append(out / "precision_recall.png")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    cm = confusion_matrix(labels, (probs >= threshold).astype(int), labels=[0, 1])
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(f"Confusion matrix at {threshold:.3f} ({title})")
    _save(fig, out / "confusion_matrix.png")
    written.append(out / "confusion_matrix.png")

    frac_pos, mean_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(mean_pred, frac_pos, marker="o", label="model")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    ax.set_xlabel("mean predicted probability"), ax.set_ylabel("observed fraction PNEUMONIA")
    ax.set_title(f"Reliability ({title})"), ax.legend(loc="upper left")
    _save(fig, out / "calibration.png")
    written.append(out / "calibration.png")
    return written


def plot_reliability(path: str | Path, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, bins: int,
                     *, threshold: float, calibrated_threshold: float) -> Path:
    """Reliability diagram before and after calibration (equal-width bins, films per bin shown)."""
    from .ood import expected_calibration_error

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, probs, cut, name in ((axes[0], raw, threshold, "raw"), (axes[1], calibrated, calibrated_threshold,
                                                                     "calibrated")):
        edges = np.linspace(0, 1, bins + 1)
        index = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
        centres, observed, counts = [], [], []
        for b in range(bins):
            inside = index == b
            if inside.any():
                centres.append(float(probs[inside].mean()))
                observed.append(float(np.asarray(labels)[inside].mean()))
                counts.append(int(inside.sum()))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
        ax.plot(centres, observed, marker="o", label=f"{name}: ECE {expected_calibration_error(labels, probs, bins):.3f}")
        for x, y, n in zip(centres, observed, counts):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
        ax.axvline(cut, color="red", lw=0.8, label=f"decision threshold {cut:.3f}")
        ax.set_xlabel(f"mean predicted probability ({bins} equal bins; films per bin)")
        ax.set_title(f"Reliability, {name} (validation, n={len(labels)})")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("observed fraction PNEUMONIA")
    _save(fig, path)
    return path
