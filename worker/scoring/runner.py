"""The model runner shared by `cxr-worker classify` and the server's scorer thread.

Files -> dicom_io (decode, display image, the one model-input function) -> batches -> model ->
sigmoid -> raw probability -> the checkpoint's calibrator -> probability; in the same forward pass
the penultimate features (a pre-hook on the last linear layer, trainer/ood.py FeatureTap) -> the
checkpoint's out-of-distribution detector -> ood_score (None for a checkpoint without one); with
``heatmaps`` also each image's class-activation map (trainer/cam.py: HiResCAM, read from the same
forward pass for ResNet18's pooled linear head, a backward pass otherwise). CUDA when present (fp16/bf16 autocast), CPU otherwise (bf16 autocast where
the CPU has native bf16 and it agrees with fp32 within 0.01, else fp32). Decoding runs on a few
threads, or processes (`serve`: decoders hold the GIL, see worker/scoring/prepare.py), ahead of the model.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from trainer.cam import CamTap, hirescam, linear_head
from trainer.checkpoint import ModelInfo, load_checkpoint, load_detector
from trainer.ood import FeatureTap
from trainer.models import cpu_supports_bf16

from .prepare import Prepared, child_init, prepare, prepare_item, ready
from ..settings import DEFAULT_MODEL

log = logging.getLogger("cxr_worker.scoring")

__all__ = ["Prepared", "Scored", "ModelRunner", "prepare", "resolve_device", "resolve_precision"]

#: How often a decode process checks that the worker that started it is still alive.
PARENT_CHECK_SECONDS = 1.0


def _parent_log_level() -> str:
    """The level the decode processes log at: this process's root level (worker.logs.setup_logging)."""
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return name if isinstance(name, str) and not name.startswith("Level ") else "INFO"


@dataclass
class DecodeBatch:
    """Items whose decoding was started (ModelRunner.decode_async); futures may be fewer after a pool failure."""

    items: list[tuple[object, Path]]
    futures: list[Future]


@dataclass
class Scored:
    prepared: Prepared
    probability: float | None = None        # calibrated (ModelInfo.calibrate); compare with runner.threshold
    inference_s: float = 0.0
    raw_probability: float | None = None    # the model's sigmoid, uncalibrated
    ood_score: float | None = None          # Mahalanobis distance; None = the checkpoint has no detector
    ood_threshold: float | None = None      # the detector's; above it the image is out of distribution
    cam: np.ndarray | None = None           # float32 (h, w): HiResCAM of the logit over the model input
                                            # (ModelRunner(heatmaps=True)); dicom_io.map_to_image places it

    @property
    def in_distribution(self) -> bool | None:
        """None when unknown (no detector, or not scored)."""
        return None if self.ood_score is None or self.ood_threshold is None else self.ood_score <= self.ood_threshold


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device = 'cuda' but CUDA is not available")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA; bf16 autocast on a CPU with native bf16 (about 2x fp32 for
    ResNet18, max |p - p_fp32| 0.0046 over 1000 real films, trained ResNet18, no label flips), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise RuntimeError("model.precision = 'fp16' is for CUDA; use fp32 or bf16 on CPU")
    return precision


@dataclass
class Beside:
    """A job started by ModelRunner.submit_beside."""

    runner: "ModelRunner"
    fn: object
    args: tuple
    future: Future | None

    def result(self):
        if self.future is not None:
            try:
                return self.future.result()
            except BrokenProcessPool:  # a decode process died meanwhile: the pool is replaced, the job runs here
                self.runner._replace_pool()
        return self.fn(*self.args)


class ModelRunner:
    """A loaded checkpoint on a device, scoring batches of model inputs."""

    def __init__(self, model_path: str | Path | None = None, device: str = "auto", precision: str = "auto",
                 batch_size: int = 16, decode_threads: int = 2, decode_processes: bool = False,
                 torch_threads: int = 0, heatmaps: bool = False,
                 preview_box: tuple[int, int] | None = None, preview_dir: Path | None = None) -> None:
        self.model_path = Path(model_path) if model_path else DEFAULT_MODEL
        if not self.model_path.is_file():
            raise FileNotFoundError(f"model checkpoint not found: {self.model_path}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.decode_processes = decode_processes
        if torch_threads > 0:  # process-wide; 0 keeps torch's default (one per core)
            torch.set_num_threads(torch_threads)
        model, info = load_checkpoint(self.model_path, self.device)
        self.model: torch.nn.Module = model.to(memory_format=torch.channels_last)
        self.info: ModelInfo = info
        detector = load_detector(self.model_path, info)
        self.detector = detector.to(self.device) if detector is not None else None
        self._tap = FeatureTap(self.model) if self.detector is not None else None
        #: maps: from the scoring forward pass (CamTap) where the head allows, else hirescam's backward pass
        self.heatmaps = heatmaps
        self._cam_tap = CamTap(self.model) if heatmaps and linear_head(self.model) is not None else None
        #: (rows, cols): decoding also keeps the display image shrunk to fit it (Prepared.preview; the
        #: heatmap picture's film box, worker.heatmap.overlay.film_box)
        self.preview_box = tuple(preview_box) if preview_box else None
        #: decode processes keep the previews in files here (prepare.keep_preview) instead of returning them
        self.preview_dir = Path(preview_dir) if preview_dir is not None and decode_processes else None
        self._pool: Executor = self._new_pool()
        log.info("model %s %s (uid %s, threshold %.4f%s) on %s, precision %s; %s", info.name, info.version,
                 info.uid, self.threshold, " calibrated" if info.calibration else "", self.device, self.precision,
                 f"out-of-distribution detector, threshold {self.ood_threshold:.3f}" if self.detector
                 else "no out-of-distribution detector")

    def _new_pool(self) -> Executor:
        if not self.decode_processes:
            return ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="decode")
        return ProcessPoolExecutor(max_workers=self.decode_threads, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=child_init,
                                   initargs=(os.getpid(), PARENT_CHECK_SECONDS, _parent_log_level()))

    def start_decoders(self, also=None) -> None:
        """Start the decode processes now (each imports the decoders, ~1 s) rather than on the first study;
        ``also``: a picklable callable each process runs too (e.g. the heatmap objects' warm-up)."""
        list(self._pool.map(ready, range(self.decode_threads)))
        if also is not None:
            list(self._pool.map(also, range(self.decode_threads)))

    def submit_beside(self, fn, *args) -> "Beside":
        """Start ``fn(*args)`` on the decode pool (its processes under ``serve``: off this process's GIL,
        beside the other jobs); ``.result()`` waits for it, and runs it here where the pool broke."""
        try:
            return Beside(self, fn, args, self._pool.submit(fn, *args))
        except BrokenProcessPool:
            self._replace_pool()
            return Beside(self, fn, args, None)

    @property
    def threshold(self) -> float:
        """The decision threshold on the calibrated scale (the same decisions as the raw threshold)."""
        return float(self.info.calibrated_threshold)

    @property
    def ood_threshold(self) -> float | None:
        return self.detector.threshold if self.detector is not None else None

    def label(self, probability: float) -> tuple[str, bool]:
        positive = probability >= self.threshold
        return self.info.class_names[1 if positive else 0], positive

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 1, 224, 224) -> raw (uncalibrated) probabilities (N,) as float64."""
        return self.predict_with_ood(batch)[0]

    def predict_with_ood(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (N, 1, 224, 224) -> raw probabilities (N,) and out-of-distribution scores (N,) or None
        (no detector), both float64, from one forward pass."""
        probs, scores, _ = self.predict_all(batch)
        return probs, scores

    def predict_all(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """float32 (N, 1, 224, 224) -> raw probabilities (N,), out-of-distribution scores (N,) or None,
        and with ``heatmaps`` the maps (N, h, w) float32 (else None)."""
        if batch.shape[0] == 0:
            return (np.zeros((0,), dtype=np.float64), (np.zeros((0,)) if self.detector else None),
                    np.zeros((0, 1, 1), dtype=np.float32) if self.heatmaps else None)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with self._autocast():
                logits = self.model(x)
            probs = torch.sigmoid(logits.float().reshape(-1))
            scores = self.detector.score(self._tap.take()) if self.detector is not None else None
            cams = self._cam_tap.take() if self._cam_tap is not None else None
        if self.heatmaps and cams is None:  # a head without the closed form: HiResCAM by autograd, in fp32
            cams, _ = hirescam(self.model, x)
            if self._tap is not None:
                self._tap.features = None  # that pass fed the feature tap too; its score is taken already
        return (probs.cpu().numpy().astype(np.float64),
                scores.cpu().numpy().astype(np.float64) if scores is not None else None,
                cams.cpu().numpy().astype(np.float32) if cams is not None else None)

    def decode_async(self, items: Iterable[tuple[object, Path]]) -> DecodeBatch:
        """Start decoding ``(key, path)`` items on the pool and return at once (collect() waits).

        The server decodes the next batch while the model scores the current one.
        """
        items = list(items)
        futures: list[Future] = []
        try:
            futures = [self._pool.submit(prepare_item, self._job(item)) for item in items]
        except BrokenProcessPool:  # a decoder died earlier: collect() decodes them one at a time
            pass
        return DecodeBatch(items, futures)

    def collect(self, batch: DecodeBatch) -> Iterator[Prepared]:
        """The batch's decoded items in input order. A decode process that dies (a decoder crashing
        on a hostile file) is replaced, and the files not yet decoded are decoded one at a time, so
        only the file that kills a decoder is given up (reason ``decode_crashed``)."""
        for index in range(len(batch.items)):
            try:
                if index >= len(batch.futures):
                    raise BrokenProcessPool("not submitted")
                yield batch.futures[index].result()
            except BrokenProcessPool:
                log.error("a decode process died; decoding the other %d files one at a time",
                          len(batch.items) - index)
                self._replace_pool()
                for key, path in batch.items[index:]:
                    yield self._prepare_alone(key, Path(path))
                return

    def prepare_many(self, items: Iterable[tuple[object, Path]]) -> Iterator[Prepared]:
        """Decode on the pool, yielding in input order (see collect)."""
        yield from self.collect(self.decode_async(items))

    def _job(self, item: tuple[object, Path]) -> tuple:
        return (*item, self.preview_box, self.preview_dir) if self.preview_box else item

    def _prepare_alone(self, key: object, path: Path) -> Prepared:
        try:
            return self._pool.submit(prepare_item, self._job((key, path))).result()
        except BrokenProcessPool:
            self._replace_pool()
            item = Prepared(key=key, path=path)
            item.error_reason, item.error_message = "decode_crashed", "the decoder process died on this file"
            return item

    def _replace_pool(self) -> None:
        broken, self._pool = self._pool, self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def score(self, items: Sequence[tuple[object, Path]]) -> list[Scored]:
        """Decode and score ``(key, path)`` items in batches; failures carry their reason."""
        return self.score_prepared(self.prepare_many(items))

    def score_prepared(self, prepared_items: Iterable[Prepared]) -> list[Scored]:
        """Score decoded items in batches of ``batch_size``; items without a tensor keep their reason."""
        results: list[Scored] = []
        pending: list[Scored] = []

        def flush() -> None:
            if not pending:
                return
            start = time.perf_counter()
            probs, ood, cams = self.predict_all(np.stack([s.prepared.tensor for s in pending]))
            share = (time.perf_counter() - start) / len(pending)
            for index, (scored, prob) in enumerate(zip(pending, probs)):
                scored.raw_probability = float(prob)
                scored.probability = self.info.calibrate(float(prob))
                scored.inference_s = share
                if ood is not None:
                    scored.ood_score, scored.ood_threshold = float(ood[index]), self.ood_threshold
                if cams is not None:
                    scored.cam = cams[index]
            pending.clear()

        for prepared in prepared_items:
            scored = Scored(prepared)
            results.append(scored)
            if prepared.tensor is not None:
                pending.append(scored)
                if len(pending) >= self.batch_size:
                    flush()
        flush()
        return results

    def describe(self) -> dict:
        return {"name": self.info.name, "version": self.info.version, "uid": self.info.uid,
                "threshold": self.threshold, "ood_threshold": self.ood_threshold, "device": str(self.device), "precision": self.precision,
                "path": str(self.model_path)}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
