"""Training: patient-grouped split, imbalance-weighted BCE, AdamW + one-cycle, early stopping on AUC.

Runs single-process (CPU or CUDA) or under ``torchrun`` with DistributedDataParallel; only rank 0
writes files. Images are decoded once into a uint8 cache so epochs are compute-bound.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import AugmentSettings, augment
from .checkpoint import ModelInfo, load_checkpoint, new_model_uid, save_checkpoint
from .data import CLASS_NAMES, grouped_split, load_images, scan_split
from .engine import Runtime, iterate_batches, predict_logits, setup_runtime, sigmoid, to_input
from .evaluate import binary_metrics, choose_threshold, plot_all
from .fit_ood import fit_extras
from .models import build_model

log = logging.getLogger("cxr_train")


@dataclass
class TrainSettings:
    """One training run, every field filled by the CLI: defaults from config/train.toml, the per-run
    flags (--limit, --name, --model-version, --no-progress) from trainer/cli.py."""

    data_root: str
    output: str
    arch: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    patience: int
    amp: str
    half: bool
    val_fraction: float
    cache_dir: str
    min_sensitivity: float
    augment: AugmentSettings
    limit: int  # use at most this many training files (0 = all), for smoke tests
    model_name: str
    model_version: str
    progress: bool
    #: config/train.toml [intended_use] and [ood]: written into the checkpoint with the detector
    intended_use: dict[str, Any] = field(default_factory=dict)
    ood_target_rejection: float = 0.005
    calibration: str = "platt"


def _balanced_limit(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified random subset of ``limit`` files (keeps patient grouping valid)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        take = max(1, round(limit * len(idx) / len(labels)))
        chosen.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(chosen))


def _evaluate_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, runtime: Runtime,
                   criterion: nn.Module, batch_size: int) -> tuple[float, float, np.ndarray]:
    logits = predict_logits(model, images, runtime, batch_size=batch_size * 2)
    loss = float(criterion(torch.from_numpy(logits), torch.from_numpy(labels).float()))
    probs = sigmoid(logits)
    return loss, float(roc_auc_score(labels, probs)), probs


def _training_weights(runtime: Runtime) -> str:
    """What the per-epoch validation figure is computed on, for the epoch line."""
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(runtime.amp_dtype)
    return f"fp32 weights, {amp} autocast" if amp else "fp32 weights"


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train one model; return the report (also written to ``output/report.json`` by rank 0)."""
    started = time.perf_counter()
    runtime = setup_runtime(settings.amp)
    torch.manual_seed(settings.seed + runtime.rank)
    out = Path(settings.output)
    cache_dir = settings.cache_dir or str(out / "cache")

    files = scan_split(Path(settings.data_root) / "train")
    if settings.limit:
        files = files.subset(_balanced_limit(files.labels, settings.limit, settings.seed))
    train_idx, val_idx = grouped_split(files, settings.val_fraction, settings.seed)
    if runtime.is_main:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if runtime.distributed:  # rank 0 fills the cache, the others read it
        if runtime.is_main:
            load_images(files, cache_dir, progress=settings.progress)
        dist.barrier()
    t0 = time.perf_counter()
    images, data_fingerprint = load_images(files, cache_dir, progress=settings.progress and runtime.is_main)
    decode_seconds = time.perf_counter() - t0
    train_x, train_y = images[train_idx], files.labels[train_idx]
    val_x, val_y = images[val_idx], files.labels[val_idx]
    n_pos = int(train_y.sum())
    pos_weight = torch.tensor([(len(train_y) - n_pos) / max(1, n_pos)])
    if runtime.is_main:
        log.info("data: %d train (%d PNEUMONIA), %d validation (%d PNEUMONIA), patient-grouped; device %s, amp %s, world %d",
                 len(train_y), n_pos, len(val_y), int(val_y.sum()), runtime.device, runtime.amp_dtype, runtime.world_size)

    model = build_model(settings.arch).to(runtime.device).to(memory_format=torch.channels_last)
    wrapped: nn.Module = DistributedDataParallel(model) if runtime.distributed else model
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(runtime.device))
    eval_criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    per_rank = int(np.ceil(len(train_y) / runtime.world_size))
    steps_per_epoch = int(np.ceil(per_rank / settings.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, epochs=settings.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)
    train_tensor = torch.from_numpy(train_x).unsqueeze(1)
    label_tensor = torch.from_numpy(train_y).float()
    if runtime.device.type == "cuda":
        train_tensor, label_tensor = train_tensor.pin_memory(), label_tensor.pin_memory()
    generator = torch.Generator().manual_seed(settings.seed)

    history: list[dict[str, Any]] = []
    best = {"auc": -1.0, "epoch": 0, "state": None}
    for epoch in range(1, settings.epochs + 1):
        epoch_start = time.perf_counter()
        wrapped.train()
        order = torch.randperm(len(train_y), generator=generator)  # same on every rank
        order = order[runtime.rank::runtime.world_size][:per_rank]
        total, seen = 0.0, 0
        bar = tqdm(list(iterate_batches(len(order), settings.batch_size)), desc=f"epoch {epoch}/{settings.epochs}",
                   unit="batch", disable=not (settings.progress and runtime.is_main), leave=False)
        for part in bar:
            idx = order[part]
            x = to_input(train_tensor[idx].to(runtime.device, non_blocking=True))
            y = label_tensor[idx].to(runtime.device, non_blocking=True)
            x = augment(x, settings.augment, generator).contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = wrapped(x).squeeze(1)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        train_loss = total / max(1, seen)
        if runtime.distributed:
            summed = torch.tensor([total, seen], dtype=torch.float64)
            dist.all_reduce(summed)
            train_loss = float(summed[0] / summed[1])
        val_loss, val_auc, _ = _evaluate_loss(model, val_x, val_y, runtime, eval_criterion, settings.batch_size)
        seconds = time.perf_counter() - epoch_start
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
                        "lr": scheduler.get_last_lr()[0], "seconds": seconds})
        improved = val_auc > best["auc"]
        if improved:
            best = {"auc": val_auc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if runtime.is_main:
            log.info("epoch %2d/%d  train loss %.4f  val loss %.4f  val AUC %.4f (%s)%s  %.0fs",
                     epoch, settings.epochs, train_loss, val_loss, val_auc, _training_weights(runtime),
                     "  *best" if improved else "", seconds)
        if epoch - best["epoch"] >= settings.patience:
            if runtime.is_main:
                log.info("early stop: no better validation AUC for %d epochs", settings.patience)
            break

    report: dict[str, Any] = {}
    if runtime.is_main:
        model.load_state_dict(best["state"])
        report = _finish(model, settings, runtime, train_x, train_y, val_x, val_y, history, best["epoch"], data_fingerprint,
                         files, train_idx, val_idx, decode_seconds, time.perf_counter() - started)
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return report


def _finish(model: nn.Module, settings: TrainSettings, runtime: Runtime, train_x: np.ndarray, train_y: np.ndarray,
            val_x: np.ndarray, val_y: np.ndarray,
            history: list[dict[str, Any]], best_epoch: int, data_fingerprint: str, files, train_idx, val_idx,
            decode_seconds: float, train_seconds: float) -> dict[str, Any]:
    """Save the best epoch, re-load it exactly as the worker will, choose the threshold, report, plot."""
    out = Path(settings.output)
    name = settings.model_name or f"cxr-pneumonia-{settings.arch}"
    provisional = ModelInfo(arch=settings.arch, name=name, version=settings.model_version, threshold=0.5,
                            uid=new_model_uid(), data_fingerprint=data_fingerprint,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    ckpt_path = save_checkpoint(model, provisional, out / "model.safetensors", half=settings.half)
    shipped, _ = load_checkpoint(ckpt_path, runtime.device)
    fp32 = type(runtime)(runtime.device, None)  # reported metrics: saved weights, full precision
    probs = sigmoid(predict_logits(shipped, val_x, fp32))
    threshold = choose_threshold(val_y, probs, settings.min_sensitivity)
    metrics = binary_metrics(val_y, probs, threshold)
    rule = f"highest threshold with validation sensitivity >= {settings.min_sensitivity} (best specificity)"
    # the out-of-distribution detector and the calibrator, fitted as `cxr-train fit-ood` fits them
    detector, ood_meta, calibration, extras = fit_extras(
        shipped, runtime, train_x, train_y, val_x, val_y, threshold, target_rejection=settings.ood_target_rejection,
        calibration_method=settings.calibration)
    for key in ("_raw_val", "_calibrated_val", "_val_y"):
        extras.pop(key)
    info = ModelInfo(**{**asdict(provisional), "threshold": threshold, "threshold_rule": rule,
                        "validation": {k: metrics[k] for k in ("n", "auc", "accuracy", "sensitivity", "specificity")},
                        "intended_use": dict(settings.intended_use), "calibration": calibration, "ood": ood_meta})
    save_checkpoint(shipped, info, ckpt_path, half=settings.half, detector=detector)
    plots = plot_all(out, val_y, probs, threshold, history, title="patient-grouped validation",
                     class_names=CLASS_NAMES)
    report = {
        "model": {k: v for k, v in asdict(info).items() if k != "validation"},
        "checkpoint": ckpt_path.name,
        "checkpoint_bytes": ckpt_path.stat().st_size,
        "settings": {**asdict(settings), "augment": asdict(settings.augment)},
        "split": {"train_files": int(len(train_idx)), "val_files": int(len(val_idx)),
                  "train_patients": len({files.patients[i] for i in train_idx}),
                  "val_patients": len({files.patients[i] for i in val_idx}), "grouped_by": "patient"},
        "best_epoch": best_epoch,
        "history": history,
        "validation": metrics,
        "calibration": extras["calibration"],
        "ood": extras["ood"],
        "timings": {"decode_seconds": decode_seconds, "total_seconds": train_seconds,
                    "epoch_seconds_mean": float(np.mean([h["seconds"] for h in history]))},
        "environment": {"torch": torch.__version__, "device": str(runtime.device),
                        "amp": str(runtime.amp_dtype), "world_size": runtime.world_size,
                        "cpu_threads": torch.get_num_threads(), "python": platform.python_version()},
        "plots": [p.name for p in plots],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    # The per-epoch lines score the live fp32 weights (under the training autocast); this line scores
    # the file the worker will load, so the two AUCs of the best epoch may differ in the 3rd decimal.
    saved = "fp16" if settings.half else "fp32"
    rounded = "rounded to fp16" if settings.half else "as trained"
    log.info("saved %s checkpoint: validation AUC %.4f (epoch %d's weights %s, scored in fp32), "
             "threshold %.4f -> sensitivity %.3f, specificity %.3f; wrote %s",
             saved, metrics["auc"], best_epoch, rounded, threshold, metrics["sensitivity"],
             metrics["specificity"], ckpt_path)
    return report
