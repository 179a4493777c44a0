"""The model the worker ships: trained by cxr-train, loaded by the worker's own loader, honest numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit.dicom_factory import wrap_grey_as_dicom

from testkit.env import REPO_ROOT
from dicom_io import read_image_file
from trainer.checkpoint import read_model_info
from worker.settings import DEFAULT_MODEL

MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def test_shipped_checkpoint_is_small_safe_and_meets_its_validation_targets() -> None:
    assert DEFAULT_MODEL.is_file(), "worker/models/default.safetensors must ship with the package"
    assert DEFAULT_MODEL.stat().st_size < MAX_SHIPPED_BYTES
    info = read_model_info(DEFAULT_MODEL)
    assert info.arch == "resnet18" and info.class_names == ["NORMAL", "PNEUMONIA"]
    assert info.data_fingerprint and info.uid.startswith("2.25.")
    # chosen on the patient-grouped validation split of train, never on test
    assert info.validation["auc"] >= 0.97
    assert info.validation["sensitivity"] >= 0.95
    report = json.loads((REPO_ROOT / "docs" / "model" / "report.json").read_text())
    assert report["model"]["uid"] == info.uid, "docs/model/report.json must describe the shipped model"


def test_worker_loader_classifies_real_films(kaggle_root: Path) -> None:
    """Real Kaggle films through the worker's ModelRunner: mostly right, and confident where obvious."""
    from worker.scoring.runner import ModelRunner

    runner = ModelRunner(device="cpu", decode_threads=1)
    files = {cls: sorted((kaggle_root / "train" / cls).glob("*.jpeg"))[-10:] for cls in ("NORMAL", "PNEUMONIA")}
    items = [(cls, path) for cls, paths in files.items() for path in paths]
    scored = runner.score(items)
    correct = sum((s.probability >= runner.threshold) == (cls == "PNEUMONIA") for (cls, _), s in zip(items, scored))
    assert correct >= 16, f"only {correct}/20 real films right"
    runner.close()


@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
def test_classify_gives_the_jpeg_probability_for_a_12_bit_dicom_of_it(kaggle_jpegs, tmp_path: Path,
                                                                      monochrome1: bool) -> None:
    """Parity end to end: the 12-bit DICOM of a Kaggle JPEG scores as the JPEG through `cxr-worker classify`."""
    jpegs = [kaggle_jpegs["NORMAL"][0], kaggle_jpegs["PNEUMONIA"][0]]
    dicoms = [wrap_grey_as_dicom(read_image_file(j), tmp_path / f"{i}.dcm", monochrome1=monochrome1)
              for i, j in enumerate(jpegs)]
    out = subprocess.run([sys.executable, "-m", "worker", "classify", "--json", *map(str, jpegs + dicoms)],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    probs = np.array([row["probability"] for row in rows])
    assert np.allclose(probs[:2], probs[2:], atol=1e-6), probs
    assert [row["label"] for row in rows[:2]] == [row["label"] for row in rows[2:]]
    # and the same out-of-distribution score: the detector sees the same picture (a JPEG has no header)
    scores = np.array([row["ood_score"] for row in rows])
    assert np.allclose(scores[:2], scores[2:], atol=1e-3), scores
    assert all(row["assessed"] and row["in_distribution"] for row in rows)
