"""`cxr-worker classify` (a real subprocess) and the pieces it shares with the server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit.env import REPO_ROOT
from testkit.worker_process import shared_runner, wrap_jpeg


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180, env=env)


def test_classify_dicom_jpeg_and_broken_file(kaggle_jpegs, tmp_path):
    jpeg = kaggle_jpegs["PNEUMONIA"][0]
    dicom = wrap_jpeg(jpeg, tmp_path / "wrapped.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"not really a data set")
    out = run_cli("classify", "--json", str(dicom), str(broken), str(jpeg))
    assert out.returncode == 1, out.stderr                    # one file failed
    assert "Traceback" not in out.stderr + out.stdout
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(dicom), str(broken), str(jpeg)]  # input order kept
    good = [line for line in lines if "error" not in line]
    bad = [line for line in lines if "error" in line]
    assert len(good) == 2 and len(bad) == 1
    assert bad[0]["error"] and bad[0]["message"]             # DicomInputError.reason + message
    for line in good:
        assert 0.0 <= line["probability"] <= 1.0
        assert line["label"] in ("NORMAL", "PNEUMONIA") and line["model"] and line["model_version"]
    by_path = {line["path"]: line for line in good}
    assert by_path[str(dicom)]["transfer_syntax"] == "1.2.840.10008.1.2.1"
    # The JPEG and the DICOM wrap of the same picture score the same.
    assert by_path[str(dicom)]["probability"] == pytest.approx(by_path[str(jpeg)]["probability"], abs=1e-6)


def test_classify_all_good_exits_zero_and_batches(kaggle_jpegs, tmp_path):
    files = kaggle_jpegs["NORMAL"][:3] + kaggle_jpegs["PNEUMONIA"][:3]
    out = run_cli("classify", "--batch-size", "4", *map(str, files))
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert len(rows) == 6 and all(row.split("\t")[2] in ("NORMAL", "PNEUMONIA") for row in rows)
    # Batched scoring gives what one-by-one scoring gives (batch composition does not change a result).
    runner = shared_runner()
    single = [runner.score([(f, f)])[0].probability for f in files[:2]]
    assert [float(row.split("\t")[1]) for row in rows[:2]] == pytest.approx(single, abs=1e-4)


def test_classify_missing_model_is_one_line_error(tmp_path, kaggle_jpegs):
    out = run_cli("classify", "--model", str(tmp_path / "nope.safetensors"), str(kaggle_jpegs["NORMAL"][0]))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "nope.safetensors" in out.stderr


def test_bad_configuration_is_rejected(tmp_path):
    import os
    env = dict(os.environ, CXR_WORKER__NETWORK__PORT="70000", CXR_WORKER__STORAGE__DATA_DIR=str(tmp_path))
    out = run_cli("status", env=env)
    assert out.returncode == 2 and "network.port" in out.stderr and "Traceback" not in out.stderr
    env = dict(os.environ, CXR_WORKER__MODEL__PRECISION="fp8", CXR_WORKER__STORAGE__DATA_DIR=str(tmp_path))
    out = run_cli("status", env=env)
    assert out.returncode == 2 and "model.precision" in out.stderr


def test_classify_takes_model_settings_from_the_environment_and_flags_over_them(monkeypatch):
    from worker.cli.main import build_parser, classify_runner

    monkeypatch.setenv("CXR_WORKER__MODEL__BATCH_SIZE", "3")
    monkeypatch.setenv("CXR_WORKER__MODEL__PRECISION", "bf16")
    monkeypatch.setenv("CXR_WORKER__MODEL__DEVICE", "cpu")
    monkeypatch.setenv("CXR_WORKER__MODEL__DECODE_THREADS", "1")
    for flags, expected in (([], (3, "bf16")), (["--batch-size", "5", "--precision", "fp32"], (5, "fp32"))):
        runner = classify_runner(build_parser().parse_args(["classify", *flags, "x.dcm"]))
        try:
            assert (runner.batch_size, runner.precision, runner.decode_threads) == (*expected, 1)
            assert str(runner.device) == "cpu"
        finally:
            runner.close()


def test_classify_reports_a_bad_model_setting_by_its_key(tmp_path):
    import os
    missing = tmp_path / "gone.safetensors"
    out = run_cli("classify", "x.dcm", env=dict(os.environ, CXR_WORKER__MODEL__PATH=str(missing)))
    assert out.returncode == 2 and "Traceback" not in out.stderr  # a start-up problem: exit 2 (issue 15)
    assert f"model.path: no such model file: {missing}" in out.stderr
    out = run_cli("classify", "x.dcm", env=dict(os.environ, CXR_WORKER__MODEL__BATCH_SIZE="0"))
    assert out.returncode == 2 and "model.batch_size" in out.stderr
