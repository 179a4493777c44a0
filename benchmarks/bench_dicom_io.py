"""How fast is dicom_io.read_dicom_display, per transfer syntax, and was the decoder choice right?

Builds a synthetic 2500 x 2048 radiograph (12-bit and 16-bit stored values), encodes it with DCMTK
and GDCM (independent encoders), then prints

1. ms per image of read_dicom_display (parse + decode + LUT + VOI -> uint8) per transfer syntax;
2. ms per decode of frame 0 for every installed pydicom plugin, relative to the one we prefer;
3. the VOI step alone: our stored-value LUT vs pydicom's apply_modality_lut + apply_voi_lut;
4. to_model_input alone: the 8-bit display image -> the 224x224 model input (resize + normalise).

Usage:  python benchmarks/bench_dicom_io.py [--quick] [--bits 12 16] [--json FILE]
Best-of-N wall time, one thread; the numbers in docs/pixel_path.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before tests/, whose dicom_io/ holds the tests
from testkit.dicom_factory import TOOL_COMMANDS, encode_with_tool, make_file, synthetic_radiograph  # noqa: E402

from dicom_io import read_dicom_display, to_model_input  # noqa: E402
from dicom_io.decode import PREFERRED_PLUGINS, frame_with_plugin, plugin_order  # noqa: E402
from dicom_io.lut import Window, apply_window, to_display_u8  # noqa: E402

ROWS, COLS = 2500, 2048
ENCODINGS = {  # label -> TOOL_COMMANDS key (None: the uncompressed original)
    "Explicit VR LE (uncompressed)": None,
    "JPEG Lossless SV1 (.70)": "dcmtk-jpeg-lossless-sv1",
    "JPEG-LS lossless (.80)": "dcmtk-jpeg-ls-lossless",
    "JPEG 2000 lossless (.90)": "gdcm-j2k-lossless",
    "RLE Lossless (.5)": "dcmtk-rle",
    "Deflated (.1.99)": "dcmtk-deflated",
}
QUICK_SKIP = {"Deflated (.1.99)"}


def best_ms(function: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` runs in ms (best-of filters out the other processes on a busy box)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def encode_all(workdir: Path, bits: int, quick: bool) -> dict[str, Path]:
    pixels = synthetic_radiograph(ROWS, COLS, bits)
    original = make_file(workdir / f"u{bits}.dcm", pixels, bits_stored=bits, window=(2 ** (bits - 1), 2 ** bits))
    files: dict[str, Path] = {}
    for label, kind in ENCODINGS.items():
        if quick and label in QUICK_SKIP:
            continue
        if kind is None:
            files[label] = original
        elif shutil.which(TOOL_COMMANDS[kind][0]):
            files[label] = encode_with_tool(kind, original, workdir / f"u{bits}_{kind}.dcm")
        else:
            print(f"  (skipping {label}: {TOOL_COMMANDS[kind][0]} not installed)")
    return files


def bench_read(files: dict[str, Path], repeats: int) -> list[dict]:
    print(f"{'transfer syntax':32s} {'read_dicom_display ms':>22s}  decoder")
    rows = []
    for label, path in files.items():
        image = read_dicom_display(path)
        ms = best_ms(lambda p=path: read_dicom_display(p), repeats)
        print(f"{label:32s} {ms:22.1f}  {image.decoder}")
        rows.append({"syntax": label, "read_dicom_display_ms": ms, "decoder": image.decoder})
    return rows


def bench_plugins(files: dict[str, Path], repeats: int) -> list[dict]:
    rows = []
    print(f"\n{'transfer syntax':32s} {'plugin':10s} {'decode ms':>10s} {'x preferred':>12s}")
    for label, path in files.items():
        ds = pydicom.dcmread(path)
        tsyntax = ds.file_meta.TransferSyntaxUID
        if tsyntax not in PREFERRED_PLUGINS:
            continue
        decoder = get_decoder(tsyntax)
        timings: dict[str, float] = {}
        for plugin in plugin_order(tsyntax, tuple(decoder.available_plugins)):
            try:
                timings[plugin] = best_ms(lambda p=plugin: frame_with_plugin(decoder, ds, p), repeats)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{label:32s} {plugin:10s} failed: {str(exc).splitlines()[-1][:60]}")
        preferred = next(iter(timings.values()), None)
        for plugin, ms in timings.items():
            print(f"{label:32s} {plugin:10s} {ms:10.1f} {ms / preferred:12.2f}")
            rows.append({"syntax": label, "plugin": plugin, "decode_ms": ms, "x_preferred": ms / preferred})
    return rows


def bench_voi(path: Path, repeats: int) -> dict:
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    window = Window(float(ds.WindowCenter), float(ds.WindowWidth))

    def ours() -> np.ndarray:  # what dicom_io.render does for 16-bit data
        table = to_display_u8(apply_window(np.arange(65536, dtype=np.float64), window), invert=False)
        return table[stored]

    def pydicom_path() -> np.ndarray:
        shown = apply_voi_lut(apply_modality_lut(stored, ds), ds)
        return np.rint(shown / shown.max() * 255).astype(np.uint8) if shown.dtype != np.uint8 else shown

    ours_ms, pydicom_ms = best_ms(ours, repeats), best_ms(pydicom_path, repeats)
    print(f"\nVOI to uint8 on {ROWS}x{COLS}: stored-value LUT {ours_ms:.1f} ms, "
          f"pydicom apply_modality_lut+apply_voi_lut {pydicom_ms:.1f} ms")
    return {"stored_value_lut_ms": ours_ms, "pydicom_modality_voi_ms": pydicom_ms}


def bench_model_input(path: Path, repeats: int) -> float:
    pixels = read_dicom_display(path).pixels
    ms = best_ms(lambda: to_model_input(pixels), repeats)
    print(f"to_model_input on the {pixels.shape[0]}x{pixels.shape[1]} display image (-> 224x224): {ms:.1f} ms")
    return ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12-bit only, fewer repeats, no Deflated")
    parser.add_argument("--bits", type=int, nargs="+", default=None, help="stored bits to test (12 16)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results: dict = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
                     "quick": args.quick, "image": [ROWS, COLS], "unit": "ms, best of repeats", "bits": {}}
    bits_list = args.bits or ([12] if args.quick else [12, 16])
    repeats = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="bench_dicom_io_") as tmp:
        for bits in bits_list:
            print(f"\n=== {ROWS}x{COLS}, {bits}-bit stored (best of {repeats}) ===")
            files = encode_all(Path(tmp), bits, args.quick)
            results["bits"][str(bits)] = {"read": bench_read(files, repeats), "plugins": bench_plugins(files, repeats)}
        results["voi"] = bench_voi(files["Explicit VR LE (uncompressed)"], repeats)
        results["model_input_ms"] = bench_model_input(files["Explicit VR LE (uncompressed)"], repeats)
    results["repeats"] = repeats
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
