"""The heatmap objects in a real PACS and a real viewer: a Kaggle film scored by the shipped model, its
HiResCAM as the fractional SEG and the RGB key image, sent with DCMTK storescu to Orthanc with its web
viewer plugin; Orthanc files all three in the film's study, renders the key image in colour, and
headless Chromium shows it in the web viewer.

CXR_HEATMAP_DOCS_SCREENSHOT=1 also writes the screenshot to docs/heatmap-viewer.png.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from testkit.env import REPO_ROOT, dcmtk, require_tool
from testkit.orthanc import OrthancServer
from testkit.worker_process import wrap_jpeg

from dicom_io import load_display_image, map_to_image, to_model_input
from trainer.cam import CamTap, relevance
from trainer.checkpoint import load_checkpoint
from worker.heatmap import (
    HeatmapKind, build_key_image, build_segmentation, encode, heatmap_uids, key_picture, strongest_region,
)
from worker.sr import pack_source, unpack_source

pytestmark = pytest.mark.orthanc
SHIPPED_MODEL = REPO_ROOT / "worker" / "models" / "default.safetensors"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "heatmap-viewer.png"
WINDOW = (1200, 900)


def colour_pixels(rgb: np.ndarray) -> int:
    """How many pixels have R, G and B all different by more than a little (a colour map, not grey)."""
    rgb = rgb.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((np.abs(r - g) > 20) & (np.abs(g - b) > 20) & (np.abs(r - b) > 20)).sum())


@pytest.fixture(scope="module")
def heatmap_files(kaggle_jpegs, tmp_path_factory) -> dict[str, Path]:
    """A real pneumonia film as a DX file, scored by the shipped model; its SEG and key image files."""
    out = tmp_path_factory.mktemp("heatmap")
    source_path = wrap_jpeg(kaggle_jpegs["PNEUMONIA"][0], out / "source.dcm", patient_name="Example^Heatmap",
                            patient_id="EXAMPLE", PatientOrientation=["R", "F"])
    network, info = load_checkpoint(SHIPPED_MODEL)
    display = load_display_image(source_path).pixels
    tap = CamTap(network)
    with torch.inference_mode():
        logit = float(network(torch.from_numpy(to_model_input(display)[None])).reshape(-1)[0])
    cam = tap.take()[0].numpy()
    tap.remove()
    probability = info.calibrate(float(torch.sigmoid(torch.tensor(logit))))
    header = unpack_source(pack_source(pydicom.dcmread(source_path, stop_before_pixels=True)))
    rows, cols = int(header.Rows), int(header.Columns)
    relevant = np.clip(map_to_image(relevance(cam), rows, cols), 0.0, 1.0)
    study, sop = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    series, instance = heatmap_uids(study, info.uid, 1, sop, HeatmapKind.SEGMENTATION)
    seg = build_segmentation(header, relevant, model=info, series_uid=series, instance_uid=instance,
                             series_number=9901, instance_number=1, manufacturer="cxr-worker",
                             transfer_syntax_uid=pydicom.uid.RLELossless)  # the compressed option, in a real PACS
    picture = key_picture(display, relevant, finding="Pneumonia", probability=probability,
                          threshold=float(info.calibrated_threshold), model_name=info.name,
                          model_version=info.version)
    series, instance = heatmap_uids(study, info.uid, 1, sop, HeatmapKind.KEY_IMAGE)
    sc = build_key_image(header, picture, model=info, series_uid=series, instance_uid=instance,
                         series_number=9902, instance_number=1, manufacturer="cxr-worker")
    files = {"source": source_path, "seg": out / "seg.dcm", "sc": out / "sc.dcm"}
    files["seg"].write_bytes(encode(seg))
    files["sc"].write_bytes(encode(sc))
    files["relevance"] = out / "relevance.npy"
    np.save(files["relevance"], relevant)
    assert len(strongest_region(relevant)) >= 4
    return files


@pytest.fixture(scope="module")
def pacs():
    with OrthancServer(plugins=["webviewer"]) as server:
        yield server


def test_orthanc_files_the_heatmap_objects_in_the_study_and_previews_the_key_image(heatmap_files, pacs, tmp_path):
    # -R: only the files' SOP classes; -xr: RLE Lossless (the SEG) and the uncompressed syntaxes;
    # -xy: JPEG Baseline (the key image), each as stored
    for names, syntax in ((("source", "seg"), "-xr"), (("sc",), "-xy")):
        sent = subprocess.run([dcmtk("storescu"), "-R", syntax, "-aet", "CXR_WORKER", "-aec", pacs.aet, "127.0.0.1",
                               str(pacs.dicom_port), *(str(heatmap_files[n]) for n in names)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    source = pydicom.dcmread(heatmap_files["source"], stop_before_pixels=True)
    instances = pacs.study_instances(str(source.StudyInstanceUID))
    by_modality = {pacs.instance_tags(item["ID"])["Modality"]: item["ID"] for item in instances}
    assert sorted(by_modality) == ["DX", "OT", "SEG"], pacs.log_tail()
    # the SEG as Orthanc keeps it: RLE Lossless, read back by highdicom with the computed values
    seg_bytes = pacs.instance_file(by_modality["SEG"])
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    values = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                               combine_segments=False, rescale_fractional=True)[0, :, :, 0]
    assert np.abs(values - np.load(heatmap_files["relevance"])).max() <= 0.5 / 255 + 1e-6
    # Orthanc's own rendering of the key image is a PNG with the colour map in it
    preview = pacs._request("GET", f"/instances/{by_modality['OT']}/preview")
    assert isinstance(preview, bytes) and preview[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(preview)) as image:
        rgb = np.asarray(image.convert("RGB"))
    assert image.mode == "RGB" and max(rgb.shape[:2]) == 1024
    assert colour_pixels(rgb) > 1000, "no colour overlay in Orthanc's preview of the key image"


def test_web_viewer_shows_the_key_image_in_chromium(heatmap_files, pacs, tmp_path):
    require_tool("chromium")
    key_image = pacs.upload(heatmap_files["sc"])  # already there after the storescu test: the same id
    series = pacs.get(f"/instances/{key_image}")["ParentSeries"]
    shot = tmp_path / "viewer.png"
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=10000", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                          f"--screenshot={shot}", f"{pacs.url}/web-viewer/app/viewer.html?series={series}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == WINDOW
        rgb = np.asarray(image.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 256  # a rendered film, not a blank page
    assert colour_pixels(rgb) > 1000, "the web viewer shows no colour overlay"
    if os.environ.get("CXR_HEATMAP_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
