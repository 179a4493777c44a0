"""The Kaggle folder layout, patient grouping, the validation split and the decoded-image cache."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from dicom_io.images import is_image_file, read_image_file
from dicom_io.kaggle import patient_from_name
from dicom_io.model_input import resize_for_model

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def patient_id(path: str | Path) -> str:
    """The patient a Kaggle file belongs to (dicom_io.kaggle), lower-cased: the split's group key."""
    return patient_from_name(path).lower()


@dataclass
class LabelledFiles:
    """Image files of one split with their labels (0 = NORMAL, 1 = PNEUMONIA)."""

    paths: list[Path]
    labels: np.ndarray

    @property
    def patients(self) -> list[str]:
        return [patient_id(p) for p in self.paths]

    def subset(self, indices: np.ndarray) -> "LabelledFiles":
        return LabelledFiles([self.paths[i] for i in indices], self.labels[indices])


def scan_split(directory: str | Path) -> LabelledFiles:
    """List ``directory/{NORMAL,PNEUMONIA}/*`` image files, sorted for reproducibility."""
    directory = Path(directory)
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = directory / class_name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"{class_dir} not found: expected the Kaggle layout {directory}/{{NORMAL,PNEUMONIA}}")
        found = sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_file(p))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise FileNotFoundError(f"no JPEG/PNG images under {directory}")
    return LabelledFiles(paths, np.asarray(labels, dtype=np.int64))


def grouped_split(files: LabelledFiles, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices, grouped by patient and stratified by class, reproducible from seed."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError("val_fraction must lie in (0, 0.5)")
    n_splits = max(2, round(1.0 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(files.labels)), files.labels, files.patients))
    return np.sort(train_idx), np.sort(val_idx)


def fingerprint(files: LabelledFiles) -> str:
    """SHA-256 over relative names, labels and bytes: identifies exactly what a model saw."""
    digest = hashlib.sha256()
    for path, label in zip(files.paths, files.labels):
        digest.update(f"{path.parent.name}/{path.name}:{int(label)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _decode(path: Path) -> np.ndarray:
    return resize_for_model(read_image_file(path))


def load_images(files: LabelledFiles, cache_dir: str | Path | None, progress: bool = True) -> tuple[np.ndarray, str]:
    """Decode every file once to uint8 (N, 224, 224) through dicom_io, cached by fingerprint."""
    key = fingerprint(files)
    cache_path = Path(cache_dir) / f"images-{key[:16]}.npy" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        images = np.load(cache_path)
        if images.shape[0] == len(files.paths):
            return images, key
    with ThreadPoolExecutor() as pool:
        decoded = list(tqdm(pool.map(_decode, files.paths), total=len(files.paths),
                            desc="decode", unit="img", disable=not progress))
    images = np.stack(decoded)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".tmp.npy")
        np.save(tmp, images)
        tmp.replace(cache_path)
    return images, key
