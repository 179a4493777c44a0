"""Fit the out-of-distribution detector and the calibrator of a model, on training's own split.

``cxr-train fit-ood --model FILE --data ROOT`` gives an existing checkpoint a detector without
retraining (same weights, new version and model UID); ``cxr-train train`` calls ``fit_extras`` at the
end of training. The detector is fitted on the train split's penultimate features, its threshold and
the calibrator on the patient-grouped validation split (trainer/data.py grouped_split, the same seed
and fraction as training). With ``--ood DIR`` (any DICOM/JPEG/PNG files that are not paediatric chest
films, e.g. ``python -m tests.testkit.ood_set DIR``) the detector is compared with the alternatives
(energy score, maximum probability, kNN on features) by AUROC against the validation films.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from dicom_io import load_display_image, resize_for_model
from dicom_io.images import is_image_file

from .checkpoint import ModelInfo, load_checkpoint, new_model_uid, rewrite_checkpoint
from .data import grouped_split, load_images, scan_split
from .engine import Runtime, iterate_batches, setup_runtime, to_input
from .ood import (FeatureTap, MahalanobisDetector, calibrate_logits, energy_score, expected_calibration_error,
                  fit_calibration, knn_score)

log = logging.getLogger("cxr_train")

#: Bins of the reported expected calibration error and of the redrawn reliability plot.
ECE_BINS = 15


@torch.inference_mode()
def logits_and_features(model: nn.Module, images_u8: np.ndarray, runtime: Runtime,
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N,) and penultimate features (N, D) of uint8 images (N, H, W), one forward pass each."""
    model.eval()
    tap = FeatureTap(model)
    logits, features = [], []
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(images_u8))
        for part in iterate_batches(len(tensor), batch_size):
            x = to_input(tensor[part].unsqueeze(1).to(runtime.device)).contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                out = model(x)
            logits.append(out.float().reshape(-1).cpu())
            features.append(tap.take().cpu())
    finally:
        tap.remove()
    if not logits:
        return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def read_ood_folder(folder: str | Path) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Every readable image directly in a folder (sorted; subfolders not walked) as uint8 (N, 224, 224);
    unreadable ones listed."""
    images, names, skipped = [], [], {}
    for path in sorted(p for p in Path(folder).glob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in (".dcm", "") and not is_image_file(path):
            continue
        try:
            images.append(resize_for_model(load_display_image(path).pixels))
            names.append(path.name)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            skipped[path.name] = f"{type(exc).__name__}: {exc}"
    return (np.stack(images) if images else np.zeros((0, 224, 224), np.uint8)), names, skipped


def _cross_validated_ece(logits: np.ndarray, labels: np.ndarray, method: str, folds: int = 5) -> float:
    """ECE of the calibrator on validation films it was not fitted on (stratified folds, pooled)."""
    from sklearn.model_selection import StratifiedKFold

    calibrated = np.zeros(len(labels))
    for fit_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=0).split(logits, labels):
        calibrated[test_idx] = calibrate_logits(fit_calibration(logits[fit_idx], labels[fit_idx], method),
                                                logits[test_idx])
    return expected_calibration_error(labels, calibrated, ECE_BINS)


def _rates(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold)) if len(scores) else 0.0


def fit_extras(model: nn.Module, runtime: Runtime, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
               val_y: np.ndarray, threshold: float, *, target_rejection: float, calibration_method: str,
               ood_x: np.ndarray | None = None, ood_names: list[str] | None = None,
               batch_size: int = 64) -> tuple[MahalanobisDetector, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Detector, ModelInfo.ood, ModelInfo.calibration and a report of both."""
    if not 0.0 < target_rejection < 0.5:
        raise ValueError(f"target_rejection must lie in (0, 0.5), got {target_rejection}")
    train_logits, train_f = logits_and_features(model, train_x, runtime, batch_size)
    val_logits, val_f = logits_and_features(model, val_x, runtime, batch_size)
    detector = MahalanobisDetector.fit(train_f, train_y)
    val_scores = detector.score_numpy(val_f)
    ood_threshold = float(np.quantile(val_scores, 1.0 - target_rejection, method="higher"))
    detector = MahalanobisDetector(detector.means, detector.precision, ood_threshold)

    calibration = fit_calibration(val_logits, val_y, calibration_method)
    raw = calibrate_logits({}, val_logits)
    calibrated = calibrate_logits(calibration, val_logits)
    raw_decisions = raw >= threshold
    calibrated_threshold = float(calibrate_logits(calibration, np.log([threshold / (1 - threshold)]))[0])
    report: dict[str, Any] = {
        "calibration": {**calibration, "fitted_on": f"validation ({len(val_y)} films)", "ece_bins": ECE_BINS,
                        "ece_before": expected_calibration_error(val_y, raw, ECE_BINS),
                        "ece_after": expected_calibration_error(val_y, calibrated, ECE_BINS),
                        "ece_after_cross_validated": _cross_validated_ece(val_logits, val_y, calibration_method),
                        "threshold_raw": threshold, "threshold_calibrated": calibrated_threshold,
                        "decisions_changed": int(np.sum(raw_decisions != (calibrated >= calibrated_threshold)))},
        "ood": {"method": "mahalanobis", "layer": "penultimate", "features": int(train_f.shape[1]),
                "covariance": "shared, Ledoit-Wolf shrinkage", "threshold": ood_threshold,
                "target_rejection": target_rejection, "fitted_on": f"train split ({len(train_y)} films)",
                "validation_films": int(len(val_y)), "validation_declined": _rates(val_scores, ood_threshold)},
    }
    if ood_x is not None and len(ood_x):
        ood_logits, ood_f = logits_and_features(model, ood_x, runtime, batch_size)
        labels = np.r_[np.zeros(len(val_y)), np.ones(len(ood_x))]
        p_val, p_ood = raw, calibrate_logits({}, ood_logits)
        candidates = {
            "mahalanobis": (val_scores, detector.score_numpy(ood_f)),
            "energy": (energy_score(val_logits), energy_score(ood_logits)),
            "max_probability": (-np.maximum(p_val, 1 - p_val), -np.maximum(p_ood, 1 - p_ood)),
            "knn10": (knn_score(train_f, val_f), knn_score(train_f, ood_f)),
        }
        comparison = {}
        for name, (a, b) in candidates.items():
            cut = float(np.quantile(a, 1.0 - target_rejection, method="higher"))
            comparison[name] = {"auroc": float(roc_auc_score(labels, np.r_[a, b])),
                                "ood_declined": _rates(b, cut), "validation_declined": _rates(a, cut)}
        ood_scores = candidates["mahalanobis"][1]
        report["ood"].update(
            ood_set={"files": len(ood_x), "declined": _rates(ood_scores, ood_threshold),
                     "scores": {n: round(float(s), 3) for n, s in zip(ood_names or [], ood_scores)}},
            comparison=comparison)
    meta = {k: report["ood"][k] for k in ("method", "layer", "threshold", "target_rejection",
                                          "validation_films", "validation_declined")}
    if "comparison" in report["ood"]:
        meta["ood_set_auroc"] = report["ood"]["comparison"]["mahalanobis"]["auroc"]
        meta["ood_set_declined"] = report["ood"]["ood_set"]["declined"]
    calib_meta = {**calibration, "ece_before": report["calibration"]["ece_before"],
                  "ece_after": report["calibration"]["ece_after"], "ece_bins": ECE_BINS}
    report["_raw_val"], report["_calibrated_val"], report["_val_y"] = raw, calibrated, val_y
    return detector, meta, calib_meta, report


def next_version(version: str) -> str:
    """1.0.0 -> 1.1.0 (a new detector/calibrator on the same weights is a minor version)."""
    parts = version.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return ".".join([parts[0], str(int(parts[1]) + 1), "0", *parts[3:]])
    return version + "+ood"


def fit_ood(model_path: str | Path, data_root: str | Path, out_path: str | Path | None, *, val_fraction: float,
            seed: int, cache_dir: str, intended_use: dict[str, Any], target_rejection: float,
            calibration_method: str, version: str = "", ood_dir: str | Path | None = None,
            report_dir: str | Path | None = None, progress: bool = False, limit: int = 0) -> dict[str, Any]:
    """Give ``model_path`` a detector and a calibrator; write the new model version to ``out_path``."""
    from .evaluate import plot_reliability

    runtime = setup_runtime("auto")
    model, info = load_checkpoint(model_path, runtime.device)
    files = scan_split(Path(data_root) / "train")
    if limit:  # a model trained with --limit: the same subset (train.py)
        from .train import _balanced_limit
        files = files.subset(_balanced_limit(files.labels, limit, seed))
    images, fingerprint = load_images(files, cache_dir or None, progress=progress)
    if info.data_fingerprint and fingerprint != info.data_fingerprint:
        raise ValueError(f"{data_root}/train is not the data {model_path} was trained on (fingerprint "
                         f"{fingerprint[:12]} != {info.data_fingerprint[:12]}): the split would differ")
    train_idx, val_idx = grouped_split(files, val_fraction, seed)
    ood_x, ood_names, skipped = (read_ood_folder(ood_dir) if ood_dir else (None, None, {}))
    detector, meta, calibration, report = fit_extras(
        model, runtime, images[train_idx], files.labels[train_idx], images[val_idx], files.labels[val_idx],
        info.threshold, target_rejection=target_rejection, calibration_method=calibration_method,
        ood_x=ood_x, ood_names=ood_names)
    new = ModelInfo(**{**asdict(info), "version": version or next_version(info.version), "uid": new_model_uid(),
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "intended_use": dict(intended_use), "calibration": calibration, "ood": meta,
                       "format_version": 2})
    raw, calibrated, val_y = report.pop("_raw_val"), report.pop("_calibrated_val"), report.pop("_val_y")
    if skipped:
        report["ood"]["skipped"] = skipped
    report["model"] = {"source": str(model_path), "version": new.version, "uid": new.uid,
                       "previous_version": info.version, "previous_uid": info.uid}
    if out_path:
        rewrite_checkpoint(model_path, new, out_path, detector)
        report["model"]["path"] = str(out_path)
        report["model"]["bytes"] = Path(out_path).stat().st_size
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_reliability(out / "calibration.png", val_y, raw, calibrated, ECE_BINS, threshold=info.threshold,
                         calibrated_threshold=new.calibrated_threshold)
        (out / "ood_report.json").write_text(json.dumps(report, indent=2))
    log.info("detector: validation declined %.4f at threshold %.3f; ECE %.4f -> %.4f",
             meta["validation_declined"], meta["threshold"], calibration["ece_before"], calibration["ece_after"])
    return report
