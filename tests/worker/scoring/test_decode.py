"""serve's decode processes: same model inputs as threads; a decoder that dies costs only its file."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

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
