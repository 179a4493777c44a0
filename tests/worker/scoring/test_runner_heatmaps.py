"""The runner's maps: from the scoring forward pass (ResNet18, closed form) or a backward pass
(SimpleCNN), the same probabilities as without them, and the display preview for the key image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dicom_io import fit_within, load_display_image, shrink_within, to_model_input
from trainer.cam import hirescam
from trainer.checkpoint import save_checkpoint
from trainer.model_info import ModelInfo, new_model_uid
from trainer.models import SimpleCNN
from worker.heatmap.overlay import BAND_HEIGHT, film_box, key_picture
from worker.scoring.prepare import prepare
from worker.scoring.runner import ModelRunner


@pytest.fixture(scope="module")
def films(kaggle_jpegs):
    return kaggle_jpegs["PNEUMONIA"][:3] + kaggle_jpegs["NORMAL"][:3]


def test_maps_come_with_the_scores_and_change_no_probability(films):
    with_maps, without = ModelRunner(device="cpu", decode_threads=1, heatmaps=True, preview_box=(160, 160)), \
        ModelRunner(device="cpu", decode_threads=1)
    try:
        a, b = with_maps.score([(f, f) for f in films]), without.score([(f, f) for f in films])
        assert [s.probability for s in a] == [s.probability for s in b]
        assert all(s.cam is None for s in b) and all(s.cam.shape == (7, 7) and s.cam.dtype == np.float32 for s in a)
        assert all(s.prepared.image_shape == (224, 224) and s.prepared.preview.shape == (160, 160) for s in a)
        # the same map as HiResCAM through autograd in fp32 (the runner may score in bf16 autocast)
        x = torch.from_numpy(np.stack([to_model_input(load_display_image(f).pixels) for f in films]))
        expected, logits = hirescam(with_maps.model, x)
        scale = float(expected.abs().max())
        assert np.abs(np.stack([s.cam for s in a]) - expected.numpy()).max() <= 0.05 * scale
        # the cells sum to the logit (less the bias): each cell's share of the decision
        bias = float(with_maps.model.fc.bias.detach())
        assert expected.sum(dim=(1, 2)).numpy() + bias == pytest.approx(logits.numpy(), abs=1e-3)
    finally:
        with_maps.close()
        without.close()


def test_a_model_without_a_pooled_head_gets_maps_by_autograd(films, tmp_path):
    path = tmp_path / "simple.safetensors"
    torch.manual_seed(0)
    save_checkpoint(SimpleCNN().eval(), ModelInfo(arch="simplecnn", name="t", version="1", threshold=0.5,
                                                  uid=new_model_uid()), path)
    runner = ModelRunner(path, device="cpu", decode_threads=1, heatmaps=True)
    try:
        scored = runner.score([(f, f) for f in films[:2]])
        assert all(s.cam.shape == (28, 28) and np.isfinite(s.cam).all() for s in scored)
        assert all(s.prepared.preview is None for s in scored)  # no preview_box: none kept
    finally:
        runner.close()


def test_the_preview_is_the_display_image_shrunk_never_enlarged(tmp_path):
    grey = (np.arange(600 * 400) % 251).astype(np.uint8).reshape(600, 400)
    small = shrink_within(grey, (300, 300))
    assert small.shape == (300, 200) and shrink_within(grey, (1000, 1000)).shape == (600, 400)
    assert fit_within((600, 400), (300, 1000)) == (300, 200) and fit_within((600, 400), (1000, 100)) == (150, 100)
    # the fast path (exact halvings, then bilinear by the factor left) is nearly one area average of
    # the whole image (and nearer to it than a box filter after the halvings, the path before it)
    rng = np.random.default_rng(0)
    for shape in ((2500, 2048), (2499, 2047), (1001, 1500)):
        image = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 3)
        fast = shrink_within(image, film_box(1024))
        area = cv2.resize(image, fast.shape[::-1], interpolation=cv2.INTER_AREA).astype(int)
        difference = np.abs(fast.astype(int) - area)
        assert fast.shape == fit_within(shape, film_box(1024)) and difference.mean() < 0.5 and difference.max() <= 4
        box = np.asarray(Image.fromarray(image).resize(fast.shape[::-1], Image.Resampling.BOX)).astype(int)
        assert np.abs(box - area).mean() > difference.mean()
    # an extreme aspect (a side rounded to 1 pixel) is area-averaged, not sampled
    stripe = np.tile(np.array([0, 255], np.uint8), (1000, 2))
    thin = shrink_within(stripe, (10, 10))
    assert thin.shape == (10, 1) and np.all(np.abs(thin.astype(int) - 127) <= 1)
    cv2.imwrite(str(tmp_path / "f.png"), grey)
    item = prepare(tmp_path / "f.png", preview_box=(300, 300))
    assert item.image_shape == (600, 400) and item.preview.shape == (300, 200) and item.preview_path is None
    # a decode process keeps it in a file instead (no 0.9 MB through the pipes), the same pixels
    kept = prepare(tmp_path / "f.png", preview_box=(300, 300), preview_dir=tmp_path)
    assert kept.preview is None and kept.preview_path.parent == tmp_path
    assert np.array_equal(np.load(kept.preview_path), item.preview)
    # a folder it cannot write to (gone, full): the preview comes back in memory, the image still scored
    fallback = prepare(tmp_path / "f.png", preview_box=(300, 300), preview_dir=tmp_path / "gone")
    assert fallback.error_reason is None and fallback.preview_path is None
    assert np.array_equal(fallback.preview, item.preview)
    # the key picture takes a preview of its film box as it is (no second resize)
    picture = key_picture(shrink_within(grey, film_box(640)), np.ones((7, 7), np.float32), finding="PNEUMONIA",
                          probability=0.9, threshold=0.5, model_name="m", model_version="1", size=640)
    assert picture.shape[0] == 640 and film_box(640) == (640 - BAND_HEIGHT, 640)