"""cxr-train on the real Kaggle data: split hygiene, learning, DDP, checkpoint safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors import safe_open

from trainer.checkpoint import (ModelInfo, load_checkpoint, load_detector, new_model_uid, read_model_info,
                                save_checkpoint)
from trainer.data import grouped_split, patient_id, scan_split
from trainer.evaluate import binary_metrics, choose_threshold
from trainer.models import build_model


def test_patient_id_parses_kaggle_names() -> None:
    assert patient_id("person1_bacteria_1.jpeg") == "person1"
    assert patient_id("person1_virus_6.jpeg") == "person1"
    assert patient_id("IM-0115-0001.jpeg") == "im-0115"
    assert patient_id("NORMAL2-IM-1234-0001.jpeg") == "normal2-im-1234"


def test_the_trainers_torch_input_is_dicom_ios_numpy_input_exactly() -> None:
    """One normalisation: the trainer's batches (torch) and serving (numpy) give identical floats."""
    from dicom_io.model_input import normalize
    from trainer.engine import to_input

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(8, 224, 224), dtype=np.uint8)
    images[0].reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every grey level at least once
    torch_path = to_input(torch.from_numpy(images).unsqueeze(1)).squeeze(1).numpy()
    numpy_path = normalize(images)
    assert torch_path.dtype == numpy_path.dtype == np.float32
    assert np.array_equal(torch_path, numpy_path)
    assert numpy_path.min() == -1.0 and numpy_path.max() == 1.0


def test_grouped_split_puts_no_patient_on_both_sides(kaggle_root: Path) -> None:
    files = scan_split(kaggle_root / "train")
    train_idx, val_idx = grouped_split(files, 0.2, seed=42)
    patients = files.patients
    train_patients = {patients[i] for i in train_idx}
    val_patients = {patients[i] for i in val_idx}
    assert not train_patients & val_patients
    assert len(train_idx) + len(val_idx) == len(files.paths)
    # stratified: both sides keep the class balance within a few percent
    assert abs(files.labels[train_idx].mean() - files.labels[val_idx].mean()) < 0.03
    # some patients really have several images, so a file-level split would have leaked
    assert len(set(patients)) < len(patients)
    # reproducible from the seed, different for another seed
    again = grouped_split(files, 0.2, seed=42)[1]
    other = grouped_split(files, 0.2, seed=7)[1]
    assert np.array_equal(val_idx, again) and not np.array_equal(val_idx, other)


def test_threshold_rule_reaches_the_sensitivity() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(400)].astype(int)
    probs = np.clip(np.r_[rng.normal(0.3, 0.15, 200), rng.normal(0.7, 0.15, 400)], 0, 1)
    threshold = choose_threshold(labels, probs, 0.95)
    metrics = binary_metrics(labels, probs, threshold)
    assert metrics["sensitivity"] >= 0.95
    # the next higher candidate threshold would break the rule: it is the best specificity
    higher = np.sort(probs[probs > threshold])[0]
    assert binary_metrics(labels, probs, higher)["sensitivity"] < 0.95


def test_checkpoint_round_trip_is_safe_and_exact(tmp_path: Path) -> None:
    model = build_model("resnet18").eval()
    info = ModelInfo(arch="resnet18", name="t", version="0", threshold=0.4, uid=new_model_uid())
    path = save_checkpoint(model, info, tmp_path / "m.safetensors")
    loaded, loaded_info = load_checkpoint(path)
    assert loaded_info == info
    x = torch.randn(2, 1, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    # the file is safetensors: no pickle opcodes, and metadata is plain JSON
    assert path.read_bytes()[8:9] == b"{"
    with pytest.raises(ValueError):
        ModelInfo(arch="resnet18", name="t", version="0", threshold=1.5, uid=new_model_uid())
    with pytest.raises(ValueError):
        read_model_info(_write_foreign_safetensors(tmp_path))


def _write_foreign_safetensors(tmp_path: Path) -> Path:
    from safetensors.torch import save_file
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    return path


def test_short_training_run_learns(kaggle_root: Path, tmp_path: Path) -> None:
    """A short real run on a small subset: validation AUC rises well above chance."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--data", str(kaggle_root), "--arch", "simplecnn", "--limit", "300",
         "--epochs", "2", "--lr", "5e-4", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    epoch_lines = [line for line in output.splitlines() if " val AUC " in line]
    assert len(epoch_lines) == 2 and all("(fp32 weights" in line for line in epoch_lines), output[-3000:]
    report = json.loads((out / "report.json").read_text())
    final = f"saved fp16 checkpoint: validation AUC {report['validation']['auc']:.4f} " \
            f"(epoch {report['best_epoch']}'s weights rounded to fp16, scored in fp32)"
    assert final in output, output[-3000:]
    assert report["validation"]["auc"] > 0.85
    assert report["validation"]["sensitivity"] >= 0.95
    assert report["split"]["grouped_by"] == "patient"
    for plot in ("loss_curves.png", "roc.png", "precision_recall.png", "confusion_matrix.png", "calibration.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, info = load_checkpoint(out / "model.safetensors")
    assert info.threshold == pytest.approx(report["validation"]["threshold"])
    assert info.data_fingerprint == report["model"]["data_fingerprint"]
    # training writes the intended use, the detector and the calibrator (as fit-ood does)
    assert info.intended_use["body_parts"] == ["CHEST"] and info.intended_use["max_age_years"] == 5.0
    detector = load_detector(out / "model.safetensors", info)
    assert detector is not None and detector.means.shape == (2, 512)
    assert info.ood["threshold"] == pytest.approx(detector.threshold) and info.ood["validation_declined"] <= 0.02
    assert info.calibration["scale"] > 0 and report["calibration"]["decisions_changed"] == 0

    # fit-ood on that checkpoint: same weights, new version and UID, a detector
    refit = tmp_path / "refit.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "fit-ood", "--model", str(out / "model.safetensors"), "--data",
         str(kaggle_root), "--limit", "300", "--out", str(refit), "--cache-dir", str(out / "cache"),
         "--target-rejection", "0.01", "--calibration", "temperature"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    new = read_model_info(refit)
    assert new.version == "1.1.0" and new.uid != info.uid and new.threshold == info.threshold
    assert new.ood["target_rejection"] == 0.01 and new.calibration["method"] == "temperature"
    assert new.calibration["bias"] == 0.0
    with safe_open(str(out / "model.safetensors"), framework="pt") as a, safe_open(str(refit), framework="pt") as b:
        weights = [k for k in a.keys() if not k.startswith("ood.")]
        assert weights and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in weights)


def test_ddp_two_cpu_processes_write_one_checkpoint(kaggle_root: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes trains and rank 0 alone writes the outputs."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
         "--data", str(kaggle_root), "--arch", "simplecnn", "--limit", "160", "--epochs", "1",
         "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["world_size"] == 2
    assert report["environment"]["device"] == "cpu"
    load_checkpoint(out / "model.safetensors")
