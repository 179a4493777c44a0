"""serve's decode processes: same model inputs as threads; a decoder that dies costs only its file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit.dicom_factory import make_dataset, synthetic_radiograph, write_dicom
from testkit.env import REPO_ROOT

from worker.scoring.runner import ModelRunner


@pytest.fixture(scope="module")
def films(kaggle_jpegs: dict[str, list[Path]]) -> list[tuple[object, Path]]:
    paths = kaggle_jpegs["NORMAL"][:2] + kaggle_jpegs["PNEUMONIA"][:2]
    return [(index, path) for index, path in enumerate(paths)] + [("missing", Path("/nonexistent/film.dcm"))]


def test_processes_score_like_threads_and_survive_a_dead_decoder(films):
    threads = ModelRunner(device="cpu", decode_threads=1)
    processes = ModelRunner(device="cpu", decode_threads=2, decode_processes=True)
    try:
        expected = [(s.probability, s.prepared.error_reason) for s in threads.score(films)]
        processes.start_decoders()
        assert [(s.probability, s.prepared.error_reason) for s in processes.score(films)] == expected
        assert expected[-1] == (None, "file_not_found")

        children = list(processes._pool._processes)
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)  # as a decoder crashing on a hostile file would
        time.sleep(0.2)
        again = processes.score(films)
        assert [(s.probability, s.prepared.error_reason) for s in again] == expected  # nothing else lost
        assert processes.score(films[:1])[0].probability == expected[0][0]  # the pool was replaced
    finally:
        processes.close()
        threads.close()


#: A serve-like process: logging set up as `cxr-worker serve` does, a real ModelRunner whose decode
#: processes alone read the file (the parent never parses it, so every pydicom message is the child's).
_DECODE_IN_A_CHILD = """
import sys
from worker.logs import setup_logging
from worker.scoring.runner import ModelRunner
setup_logging("INFO")
runner = ModelRunner(device="cpu", decode_threads=1, decode_processes=True)
try:
    [scored] = runner.score([("film", sys.argv[1])])
    print("probability", scored.probability, scored.prepared.error_reason, flush=True)
finally:
    runner.close()
"""
_FORMATTED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING pydicom: Unknown encoding <value hidden> - "
                        r"using default encoding instead$", re.MULTILINE)


def test_a_decode_process_warning_reaches_the_log_formatted_without_its_value(tmp_path: Path) -> None:
    """pydicom warns (with the quoted value) while a decode process reads the file: the parent's log gets
    the formatted record with the value hidden, and neither the raw warning nor the value."""
    ds = make_dataset(synthetic_radiograph(64, 48, 12), window=(2000, 3000))
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.PatientName = "Doe^Jane"
    path = write_dicom(ds, tmp_path / "odd_charset.dcm")
    done = subprocess.run([sys.executable, "-c", _DECODE_IN_A_CHILD, str(path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^probability 0\.\d+ None$", done.stdout, re.MULTILINE), done.stdout  # it was scored
    assert _FORMATTED.search(done.stderr), done.stderr
    assert "ISO_IR 999" not in done.stderr and "Doe" not in done.stderr
    assert "UserWarning" not in done.stderr and "warn_and_log" not in done.stderr  # no raw warnings.warn copy
    unformatted = [line for line in done.stderr.splitlines() if line and not re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert not unformatted, done.stderr


def test_rescale_slope_zero_is_a_recorded_reason_not_a_score(tmp_path: Path) -> None:
    """prepare (what the decode processes run) gives bad_rescale for slope 0, never a tensor scored as slope 1."""
    from worker.scoring.prepare import prepare

    flat = write_dicom(make_dataset(synthetic_radiograph(64, 48, 12), rescale=(0, 100)), tmp_path / "flat.dcm")
    item = prepare(flat)
    assert (item.error_reason, item.tensor) == ("bad_rescale", None) and "Slope 0" in item.error_message
    usable = prepare(write_dicom(make_dataset(synthetic_radiograph(64, 48, 12), rescale=(2, 100)), tmp_path / "ok.dcm"))
    assert usable.error_reason is None and usable.tensor is not None
