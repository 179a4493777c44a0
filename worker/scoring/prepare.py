"""One file -> model input, without torch: runs in the scorer's decode threads or processes.

Decoders hold the GIL for long stretches (gdcm's JPEG Lossless ~150 ms per 2500x2048 image, as does
pylibjpeg), which stalls every other thread of the process: the network threads that answer C-STOREs,
SR building, the outbox. `cxr-worker serve` therefore decodes in a few worker processes
(`model.decode_processes`); this module is all they import (no torch, no database).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_io import DicomInputError, load_display_image, shrink_within, to_model_input

from ..logs import setup_child_logging

log = logging.getLogger("cxr_worker.scoring")


@dataclass
class Prepared:
    """One file turned into model input, or the reason it could not be."""

    key: object
    path: Path
    tensor: np.ndarray | None = None            # float32 (1, 224, 224)
    transfer_syntax: str | None = None
    frame: int | None = None
    number_of_frames: int = 1
    notes: list[str] = field(default_factory=list)
    error_reason: str | None = None
    error_message: str | None = None
    decode_s: float = 0.0
    image_shape: tuple[int, int] | None = None  # (rows, columns) of the decoded image (its frame)
    preview: np.ndarray | None = None           # uint8, the display image shrunk to the key picture's film
                                                # box (asked for by preview_box; the heatmap's background)
    preview_path: Path | None = None            # ... or the .npy file it was kept in (preview_dir: keep_preview)


def keep_preview(preview: np.ndarray, directory: Path) -> Path:
    """A decode process's preview kept in a file of ``directory`` for the process that draws the
    heatmap, instead of crossing two pipes (to the scorer, and back to a decode process for a positive
    study: ~2 ms of the main process's CPU per 0.9 MB each way, where the scorer's threads share one
    GIL). Page cache only (no fsync): the scorer removes it once the study is finished, and the folder
    goes with this worker's incoming folder (worker.store.spool)."""
    path = Path(directory) / f"{uuid.uuid4().hex}.npy"
    np.save(path, preview, allow_pickle=False)
    return path


def prepare(path: str | Path, key: object = None, preview_box: tuple[int, int] | None = None,
            preview_dir: Path | None = None) -> Prepared:
    """Decode one file (DICOM by content, JPEG/PNG by suffix) to model input; never raises.
    ``preview_box`` (rows, cols) also keeps the display image shrunk to fit it (``Prepared.preview``,
    dicom_io.shrink_within: the heatmap picture's film box, worker.heatmap.overlay.film_box), in a file
    of ``preview_dir`` where given (``Prepared.preview_path``, keep_preview)."""
    path = Path(path)
    item = Prepared(key=key if key is not None else path, path=path)
    start = time.perf_counter()
    try:
        image = load_display_image(path)
        item.tensor = to_model_input(image.pixels)
        item.image_shape = tuple(image.pixels.shape[:2])
        if preview_box:
            item.preview = shrink_within(image.pixels, preview_box)
            if preview_dir is not None:
                try:
                    item.preview_path, item.preview = keep_preview(item.preview, preview_dir), None
                except OSError as exc:  # e.g. a full disk: the preview goes through the pipe instead
                    log.warning("could not keep a preview in %s (%s); it is returned instead", preview_dir, exc)
        item.transfer_syntax = image.transfer_syntax
        item.frame = image.frame
        item.number_of_frames = image.number_of_frames
        item.notes = list(image.notes)
    except DicomInputError as exc:
        item.error_reason, item.error_message = exc.reason, exc.message
    except FileNotFoundError as exc:
        item.error_reason, item.error_message = "file_not_found", str(exc)
    except MemoryError:
        item.error_reason, item.error_message = "out_of_memory", "image too large to decode"
    except Exception as exc:  # noqa: BLE001 - a bad file is a recorded reason, never a crash
        item.error_reason, item.error_message = "decode_failed", f"{type(exc).__name__}: {exc}"
    item.decode_s = time.perf_counter() - start
    return item


def prepare_item(key_path: tuple) -> Prepared:
    """``prepare`` for ``Executor.map`` over ``(key, path)`` or ``(key, path, preview_box, preview_dir)``
    tuples (a picklable top-level function)."""
    key, path, *rest = key_path
    return prepare(path, key, *rest)


def ready(_: object = None) -> bool:
    """A no-op task: starting a decode process imports this module and the decoders once."""
    import dicom_io.decode  # noqa: F401 - the plugin registry

    return True


def child_init(parent_pid: int, check_seconds: float, log_level: str = "INFO") -> None:
    """In a decode process: the parent's logging (``log_level``, the guards of worker/logs.py, Python
    warnings and the decoders' stderr through logging: a spawned process inherits none of it), Ctrl-C
    is the parent's business, and exit when the parent is gone (a worker killed with SIGKILL must not
    leave idle decoders behind)."""
    setup_child_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2

    cv2.setNumThreads(1)  # one job per process; OpenCV's own thread pool would oversubscribe the cores

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_seconds)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
