"""The shipped model's out-of-distribution detector and calibrator, through the worker's ModelRunner
on real images: the pydicom-data OOD set (tests/testkit/ood_set.py) and real validation films."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from testkit.ood_set import SOURCES, build_ood_set
from trainer.checkpoint import ModelInfo, load_detector, read_model_info, rewrite_checkpoint
from trainer.data import grouped_split, scan_split
from trainer.ood import calibrate_logits
from worker.settings import DEFAULT_MODEL

VALIDATION_FILMS = 300


@pytest.fixture(scope="module")
def runner():
    from worker.scoring.runner import ModelRunner

    runner = ModelRunner(device="cpu", decode_threads=2)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def ood_set(tmp_path_factory):
    return build_ood_set(tmp_path_factory.mktemp("ood"))


def test_the_shipped_model_states_its_intended_use_detector_and_calibrator():
    info = read_model_info(DEFAULT_MODEL)
    assert info.format_version == 2 and info.intended_use["max_age_years"] == 5.0
    detector = load_detector(DEFAULT_MODEL, info)
    assert detector is not None and detector.precision.shape == (512, 512)
    assert info.ood["method"] == "mahalanobis" and info.ood["validation_declined"] <= 0.01
    assert info.calibration["ece_after"] < info.calibration["ece_before"]


def test_every_image_of_the_ood_set_is_out_of_distribution_dicom_and_png_alike(runner, ood_set):
    assert len(ood_set) == len(SOURCES) >= 12
    items = [(("dcm", c.name), c.dicom) for c in ood_set] + [(("png", c.name), c.png) for c in ood_set]
    scored = {s.prepared.key: s for s in runner.score(items)}
    for case in ood_set:
        dcm, png = scored[("dcm", case.name)], scored[("png", case.name)]
        assert dcm.ood_score is not None, (case.name, dcm.prepared.error_reason)
        assert dcm.in_distribution is False, (case.name, case.description, dcm.ood_score, runner.ood_threshold)
        # the same picture through the DICOM and the PNG paths: the same score
        assert dcm.ood_score == pytest.approx(png.ood_score, abs=1e-3), case.name


def test_at_most_one_percent_of_real_validation_films_declined_and_decisions_unchanged(runner, kaggle_root):
    files = scan_split(Path(kaggle_root) / "train")
    _, val_idx = grouped_split(files, 0.2, 42)  # the split training and fit-ood used (config/train.toml)
    chosen = val_idx[np.linspace(0, len(val_idx) - 1, VALIDATION_FILMS).astype(int)]
    scored = runner.score([(int(i), files.paths[i]) for i in chosen])
    assert all(s.ood_score is not None for s in scored)
    declined = sum(s.in_distribution is False for s in scored)
    assert len(scored) >= 200 and declined / len(scored) <= 0.01, declined
    # calibrated probability vs the calibrated threshold: exactly the raw decisions
    info = runner.info
    raw = np.array([s.raw_probability for s in scored])
    calibrated = np.array([s.probability for s in scored])
    assert np.array_equal(raw >= info.threshold, calibrated >= runner.threshold)
    clipped = np.clip(raw, 1e-12, 1 - 1e-12)  # as ModelInfo.calibrate clips
    logits = np.log(clipped / (1 - clipped))
    assert np.allclose(calibrate_logits(info.calibration, logits), calibrated, atol=1e-9)


def test_a_checkpoint_without_detector_still_scores_and_says_no_detector(tmp_path, kaggle_jpegs):
    """A format-1 checkpoint (no intended use, calibrator or detector): loads, scores, reports 'no detector'."""
    from worker.cli.classify import record, run
    from worker.scoring.runner import ModelRunner

    info = read_model_info(DEFAULT_MODEL)
    old = ModelInfo(**{**asdict(info), "intended_use": {}, "calibration": {}, "ood": {}, "format_version": 1})
    path = rewrite_checkpoint(DEFAULT_MODEL, old, tmp_path / "v1.safetensors")
    runner = ModelRunner(path, device="cpu", decode_threads=1)
    try:
        assert runner.detector is None and runner.ood_threshold is None and runner.threshold == info.threshold
        scored = runner.score([(p, p) for p in kaggle_jpegs["NORMAL"][:2]])
        assert all(s.ood_score is None and s.in_distribution is None for s in scored)
        assert all(s.probability == s.raw_probability for s in scored)
        rec = record(scored[0], runner)
        assert rec["ood"] == "no detector" and rec["assessed"] is True and rec["in_distribution"] is None
        out = io.StringIO()
        assert run([str(kaggle_jpegs["NORMAL"][0])], runner, True, out) == 0
        assert json.loads(out.getvalue())["label"] in ("NORMAL", "PNEUMONIA")
    finally:
        runner.close()
