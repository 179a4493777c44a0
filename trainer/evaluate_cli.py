"""``cxr-train evaluate``: a checkpoint on any labelled folder, through the same pixel path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .data import load_images, scan_split
from .engine import predict_logits, setup_runtime, sigmoid
from .evaluate import binary_metrics, plot_all


def evaluate_folder(model_path: str | Path, data_dir: str, output: str, batch_size: int = 64,
                    progress: bool = True) -> dict[str, Any]:
    """Metrics at the stored threshold and the plots, written to ``output``."""
    runtime = setup_runtime("off")
    model, info = load_checkpoint(model_path, runtime.device)
    files = scan_split(data_dir)
    images, data_fingerprint = load_images(files, None, progress=progress)
    probs = sigmoid(predict_logits(model, images, runtime, batch_size))
    metrics = binary_metrics(files.labels, probs, info.threshold)
    metrics.update({"model": {"name": info.name, "version": info.version, "uid": info.uid},
                    "data": str(data_dir), "data_fingerprint": data_fingerprint})
    out = Path(output)
    plot_all(out, files.labels, probs, info.threshold, title=Path(data_dir).name, class_names=info.class_names)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
