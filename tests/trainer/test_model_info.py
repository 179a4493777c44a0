"""The model's metadata without torch: the same names as the checkpoint module, the zoo's architectures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import checkpoint, model_info, models

SHIPPED = Path(__file__).resolve().parents[2] / "worker" / "models" / "default.safetensors"


def test_model_info_names_the_architectures_of_the_zoo() -> None:
    """ModelInfo accepts exactly the architectures trainer/models.py builds."""
    assert model_info.ARCHITECTURES == models.ARCHITECTURES
    for arch in model_info.ARCHITECTURES:
        models.build_model(arch)
    with pytest.raises(ValueError, match="unknown architecture"):
        model_info.ModelInfo(arch="vit", name="t", version="0", threshold=0.4, uid=model_info.new_model_uid())


def test_checkpoint_re_exports_the_metadata() -> None:
    for name in ("FORMAT_VERSION", "METADATA_KEY", "ModelInfo", "new_model_uid", "read_model_info"):
        assert getattr(checkpoint, name) is getattr(model_info, name)


def test_metadata_reads_without_torch() -> None:
    """read_model_info of the shipped model in a process that never imports torch."""
    code = ("import sys; from trainer.model_info import read_model_info; "
            f"info = read_model_info({str(SHIPPED)!r}); "
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'; "
            "print(info.arch, info.uid)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    arch, uid = run.stdout.split()
    assert arch in model_info.ARCHITECTURES and uid.startswith("2.25.")
