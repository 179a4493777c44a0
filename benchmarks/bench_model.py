#!/usr/bin/env python
"""Images/s of the shipped model for each inference path, and how far each one is from fp32.

    python benchmarks/bench_model.py                 # full run (a few minutes; torch.compile dominates)
    python benchmarks/bench_model.py --quick         # smoke test: short windows, no torch.compile (--compile adds it)
    python benchmarks/bench_model.py --no-compile --no-onnx --json out.json
    python benchmarks/bench_model.py --quick --no-onnx --only "bf16 autocast channels_last" --deviation-images 1000

Paths (CPU): eager fp32, eager fp32 channels_last, bf16 autocast (with and without channels_last),
torch.compile fp32 / bf16 (channels_last; compile time reported separately, skipped if compiling
fails), ONNX Runtime fp32 (needs the optional extra: pip install -e '.[bench]'). With CUDA: fp32 and
fp16 autocast on the GPU.

Accuracy: every path scores the same REAL inputs (Kaggle JPEGs through dicom_io.read_image_file +
to_model_input, i.e. exactly the worker's model input) at every batch size it is timed at; the
reported deviation is max |p - p_fp32| of the sigmoid probability over all of them, against eager
fp32 at batch 1. "ok" means within --tolerance (0.01). The recommended default is the fastest
path within tolerance (by the geometric mean of images/s over the batch sizes).
--deviation-images N adds a larger check of the worker's CPU default alone: bf16 autocast +
channels_last against eager fp32 over N real films (half NORMAL, half PNEUMONIA), max and mean
|p_bf16 - p_fp32| and the decisions that flip at the model's threshold.

Detector (--detector-batch, on by default; --no-detector skips it): the worker's own ModelRunner
(worker/scoring/runner.py, precision "auto") timed with the out-of-distribution score computed in the
same forward pass (features from a pre-hook, Mahalanobis distance) against the same runner with the
hook removed and no detector, in alternating windows of the same run; plus the distance alone on
(batch, 512) features. Printed as ms per image and the ratio to the model alone.

Heatmap (--cam-batch, on by default; --no-cam skips it): the cost of the class-activation map
(trainer/cam.py HiResCAM) at the worker's batch size. The worker's ModelRunner (precision "auto", its
detector hook on, as it scores) timed alone and with a ``CamTap`` attached (the forward hook on
layer4 and the closed-form maps, copied to the CPU), in alternating windows of the same run; then the
autograd path ``hirescam`` (fp32, the path of models without a pooled linear head) against the eager
fp32 forward pass alone; plus ``dicom_io.map_to_image`` of one 7 x 7 map to a 2500 x 2048 source.
On the CPU, and on CUDA when present. Printed as ms per image and the ratios.

Timing: torch.inference_mode, torch.set_num_threads(all cores), warm-up, then --repeats timed
windows of at least --min-time seconds each; the median window gives images/s. Run it on an
otherwise idle machine: anything else using the cores makes the numbers meaningless. The script
measures that itself: the CPU share of every process that is not this benchmark (from /proc/stat
and /proc/<pid>/stat) for 2 s before it starts and during each path's timing, and warns when it is
above --busy-threshold of the machine's cores, naming the busiest processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_io import read_image_file, to_model_input
from trainer.checkpoint import load_checkpoint

DEFAULT_MODEL = REPO / "worker" / "models" / "default.safetensors"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray224" / "train"

Runner = Callable[[torch.Tensor], torch.Tensor]   # float32 NCHW (CPU) -> logits (N, 1) on CPU


@dataclass
class PathResult:
    name: str
    status: str = "ok"                     # ok | skipped | failed
    note: str = ""
    ips: dict[int, float] = field(default_factory=dict)       # batch -> images/s (median)
    spread: dict[int, float] = field(default_factory=dict)    # batch -> (max-min)/median of the windows
    setup_s: float | None = None            # export/compile time not part of the timing
    compile_s: dict[int, float] = field(default_factory=dict)  # batch -> first call (compile) seconds
    max_dev: float | None = None            # max |p - p_fp32| over real inputs
    label_flips: int | None = None          # decisions at the model threshold that differ from fp32
    other_load: float | None = None         # other processes' share of all cores while this path was timed

    def geomean(self) -> float:
        vals = [v for v in self.ips.values() if v > 0]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else 0.0


# ---------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    info = {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "onnxruntime": ort_version,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}
    try:
        info["bf16_native"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["bf16_native"] = False
    return info


class OtherLoad:
    """CPU share of the machine used by processes outside this benchmark's process tree.

    ``mark()`` then ``share()``: (busy jiffies of all cores, /proc/stat) minus (this process, its
    reaped children and its live descendants, /proc/<pid>/stat), over all cores' jiffies in the
    window; 0.25 on a 2-core machine = half a core used by someone else. ``top()`` names the busiest
    other processes of the window. Linux only; elsewhere share() is None.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int, int, dict[int, tuple[str, int]]] | None = None

    @staticmethod
    def _procs() -> dict[int, tuple[int, str, int]]:
        """pid -> (ppid, comm, utime+stime) for every readable process."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    raw = fh.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            out[int(entry)] = (int(fields[1]), comm, int(fields[11]) + int(fields[12]))
        return out

    def _sample(self) -> tuple[int, int, int, dict[int, tuple[str, int]]]:
        with open("/proc/stat") as fh:
            cpu = [int(v) for v in fh.readline().split()[1:]]
        total, busy = sum(cpu[:8]), sum(cpu[:8]) - cpu[3] - cpu[4]   # idle, iowait
        procs = self._procs()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [me]
        while todo:
            pid = todo.pop()
            if pid not in ours:
                ours.add(pid)
                todo += children.get(pid, [])
        with open(f"/proc/{me}/stat") as fh:
            raw = fh.read()
        f = raw[raw.rindex(")") + 2:].split()
        own = sum(procs[p][2] for p in ours if p in procs) + int(f[13]) + int(f[14])   # + reaped children
        others = {pid: (comm, t) for pid, (_, comm, t) in procs.items() if pid not in ours}
        return total, busy, own, others

    def mark(self) -> None:
        self._t0 = time.perf_counter()
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None

    def share(self) -> float | None:
        """Other processes' share of all cores since mark() (0..1), or None where /proc is not there."""
        if self._start is None:
            return None
        try:
            total, busy, own, others = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        t0, b0, o0, others0 = self._start
        self._end_others, self._start_others = others, others0
        self._window_s = time.perf_counter() - self._t0
        if total <= t0:
            return 0.0
        return max(0.0, ((busy - b0) - (own - o0)) / (total - t0))

    def top(self, n: int = 3) -> list[str]:
        """The busiest other processes between mark() and the last share(), as 'comm (pid) N% of a core'."""
        start, end = getattr(self, "_start_others", {}), getattr(self, "_end_others", {})
        if self._start is None or not end:
            return []
        hz = os.sysconf("SC_CLK_TCK")
        deltas = sorted(((t - start.get(pid, (comm, 0))[1], pid, comm) for pid, (comm, t) in end.items()), reverse=True)
        window = getattr(self, "_window_s", None)
        out = []
        for d, pid, comm in deltas[:n]:
            if window and d / hz / window < 0.05:   # below 5 % of a core: not worth naming
                break
            out.append(f"{comm} ({pid}) {d / hz:.1f} s of CPU" + (f" = {d / hz / window:.0%} of a core" if window else ""))
        return out

    def measure(self, seconds: float) -> float | None:
        """Mark, sleep ``seconds``, return share()."""
        self.mark()
        time.sleep(seconds)
        return self.share()


def load_real_inputs(root: Path, n: int, seed: int = 0) -> np.ndarray:
    """n Kaggle JPEGs (half NORMAL, half PNEUMONIA) -> float32 (n, 1, 224, 224) via dicom_io."""
    files: list[Path] = []
    for cls in ("NORMAL", "PNEUMONIA"):
        found = sorted((root / cls).glob("*.jp*g"))
        if not found:
            raise SystemExit(f"no JPEGs under {root / cls} (use --data ROOT/train)")
        rng = np.random.default_rng(seed)
        take = rng.choice(len(found), size=min(len(found), (n + 1) // 2), replace=False)
        files += [found[i] for i in sorted(take)]
    files = files[:n]
    return np.stack([to_model_input(read_image_file(f)) for f in files]).astype(np.float32)


def batch_of(inputs: np.ndarray, batch: int) -> torch.Tensor:
    reps = -(-batch // len(inputs))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch]))


def time_runner(run: Runner, x: torch.Tensor, warmup: int, repeats: int, min_time: float,
                sync: Callable[[], None]) -> tuple[float, float]:
    """(median images/s, relative spread) over ``repeats`` windows of >= min_time seconds."""
    for _ in range(warmup):
        run(x)
    sync()
    start = time.perf_counter()
    run(x)
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    iters = max(1, math.ceil(min_time / once))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            run(x)
        sync()
        rates.append(iters * x.shape[0] / (time.perf_counter() - start))
    med = statistics.median(rates)
    return med, (max(rates) - min(rates)) / med


def probabilities(run: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch]))
        out.append(torch.sigmoid(run(chunk).float().reshape(-1)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------------- inference paths
def eager(model, channels_last: bool, amp: torch.dtype | None, device: str = "cpu") -> Runner:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = model.to(device=device, memory_format=fmt)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            ctx = torch.autocast(device_type=device, dtype=amp) if amp is not None else contextlib.nullcontext()
            with ctx:
                y = m(x)
            return y.float().cpu()
    return run


def compiled(model, amp: torch.dtype | None) -> Runner:
    m = torch.compile(model.to(memory_format=torch.channels_last), dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast(device_type="cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
            with ctx:
                return m(x).float()
    return run


def onnx_runner(model, workdir: Path, threads: int) -> tuple[Runner, float, str]:
    import onnxruntime as ort

    path = workdir / "model.onnx"
    start = time.perf_counter()
    example = torch.zeros(2, 1, 224, 224)
    how = ""
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["x"], output_names=["logit"],
                          dynamic_shapes={"x": {0: batch}}, optimize=True)
        how = "torch.onnx.export(dynamo=True)"
    except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter
        print(f"  dynamo ONNX export failed ({type(exc).__name__}: {str(exc)[:120]}); trying dynamo=False",
              file=sys.stderr)
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["logit"],
                          dynamic_axes={"x": {0: "batch"}, "logit": {0: "batch"}}, opset_version=17)
        how = "torch.onnx.export(dynamo=False)"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    setup = time.perf_counter() - start

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = sess.run(None, {"x": x.numpy()})
        return torch.from_numpy(y)
    return run, setup, f"{how}, ORT {ort.__version__}, {threads} intra-op threads"


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kaggle train folder (NORMAL/, PNEUMONIA/)")
    ap.add_argument("--images", type=int, default=64, help="real images for the deviation check")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.6, help="seconds per timed window")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run (16 images, 2 short windows, no torch.compile unless --compile)")
    ap.add_argument("--compile", action="store_true",
                    help="with --quick: time the torch.compile paths too (a cold inductor cache takes minutes)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile paths")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--only", help="comma-separated path names to run (eager fp32 always runs)")
    ap.add_argument("--deviation-images", type=int, default=0, metavar="N",
                    help="also compare bf16 autocast channels_last (the worker's CPU default) with eager fp32 "
                         "over N real films (default 0: off)")
    ap.add_argument("--deviation-batch", type=int, default=8, help="batch size of that comparison")
    ap.add_argument("--busy-threshold", type=float, default=0.10,
                    help="warn when other processes use more than this share of all cores (default 0.10)")
    ap.add_argument("--no-detector", action="store_true", help="skip the out-of-distribution detector's cost")
    ap.add_argument("--detector-batch", type=int, default=16, help="batch of the detector timing (model.batch_size)")
    ap.add_argument("--no-cam", action="store_true", help="skip the heatmap (class-activation map) cost")
    ap.add_argument("--cam-batch", type=int, default=16, help="batch of the heatmap timing (model.batch_size)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.compile and args.no_compile:
        ap.error("--compile and --no-compile exclude each other")
    if args.quick:
        args.images, args.repeats, args.min_time, args.warmup = 16, 2, 0.2, 1
        args.no_compile = args.no_compile or not args.compile

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",")]
    info = machine_info()
    load = OtherLoad()
    before = load.measure(2.0)
    busy_notes: list[str] = []
    if before is not None and before > args.busy_threshold:
        busy_notes.append(f"before the run: other processes used {before:.0%} of the {info['nproc']} cores "
                          f"({'; '.join(load.top()) or 'short-lived processes: none of those still running used 5 % of a core'})")
    print(f"machine: {info['nproc']} cores, {info['cpu']}, torch {info['torch']} ({info['cpu_capability']}, "
          f"native bf16: {info['bf16_native']}), onnxruntime {info['onnxruntime']}, cuda: {info['cuda']}")
    print(f"threads: {torch.get_num_threads()}, batches {batches}, {args.repeats} windows x >= {args.min_time}s, "
          f"{'QUICK (smoke test, not a measurement)' if args.quick else 'full'}")
    print("other processes' load before the run: " + (f"{before:.0%} of all cores" if before is not None
                                                     else "unknown (no /proc)"))
    if busy_notes:
        print("WARNING: the machine is busy; these timings are NOT valid measurements:")
        for line in busy_notes:
            print("   ", line)

    _, minfo = load_checkpoint(args.model, "cpu")
    print(f"model: {args.model} ({minfo.arch}, {minfo.name} {minfo.version}, threshold {minfo.threshold:.4f})")
    t0 = time.perf_counter()
    inputs = load_real_inputs(args.data, args.images)
    print(f"real inputs: {len(inputs)} Kaggle JPEGs from {args.data} ({time.perf_counter() - t0:.1f} s to load)")

    def fresh():
        m, _ = load_checkpoint(args.model, "cpu")
        return m

    # reference: eager fp32, batch 1 (no batching effects in the reference)
    ref_run = eager(fresh(), channels_last=False, amp=None)
    p_ref = probabilities(ref_run, inputs, 1)
    ref_labels = p_ref >= minfo.threshold

    cpu_sync = lambda: None
    paths: list[tuple[str, Callable[[], tuple[Runner, float | None, str]], Callable[[], None], bool]] = []

    def simple(factory: Callable[[], Runner], note: str = ""):
        return lambda: (factory(), None, note)

    paths.append(("eager fp32", simple(lambda: eager(fresh(), False, None)), cpu_sync, False))
    paths.append(("eager fp32 channels_last", simple(lambda: eager(fresh(), True, None)), cpu_sync, False))
    paths.append(("bf16 autocast", simple(lambda: eager(fresh(), False, torch.bfloat16)), cpu_sync, False))
    paths.append(("bf16 autocast channels_last",
                  simple(lambda: eager(fresh(), True, torch.bfloat16)), cpu_sync, False))
    if not args.no_compile:
        paths.append(("compile fp32 channels_last", simple(lambda: compiled(fresh(), None), "inductor"),
                      cpu_sync, True))
        paths.append(("compile bf16 channels_last", simple(lambda: compiled(fresh(), torch.bfloat16), "inductor"),
                      cpu_sync, True))
    cleanup = contextlib.ExitStack()   # the ONNX file's folder (~44 MB), removed however the run ends
    if not args.no_onnx:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cxr-bench-onnx-")))
        paths.append(("onnxruntime fp32", lambda: onnx_runner(fresh(), tmp, threads), cpu_sync, False))
    if torch.cuda.is_available():
        cuda_sync = torch.cuda.synchronize
        paths.append(("cuda fp32", simple(lambda: eager(fresh(), True, None, "cuda")), cuda_sync, False))
        paths.append(("cuda fp16 autocast",
                      simple(lambda: eager(fresh(), True, torch.float16, "cuda")), cuda_sync, False))
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")} | {"eager fp32"}
        paths = [p for p in paths if p[0] in wanted]

    with cleanup:
        results = run_paths(paths, inputs, batches, args, p_ref, ref_labels, minfo.threshold, load)
    for r in results:
        if r.other_load is not None and r.other_load > args.busy_threshold:
            busy_notes.append(f"while timing {r.name}: other processes used {r.other_load:.0%} of the cores")
    deviation = deviation_check(fresh, args, minfo.threshold) if args.deviation_images > 0 else None
    detector = None if args.no_detector else detector_cost(args, inputs)
    cam = None if args.no_cam else cam_cost(args, inputs, load)
    return report(results, batches, args, info, inputs, minfo, busy_notes, before, deviation, detector, cam)


def _ms_per_image(fn: Callable[[], object], images: int, min_time: float, sync: Callable[[], None]) -> float:
    """One warm call, then calls for at least ``min_time`` seconds: ms per image."""
    fn()
    sync()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < min_time:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - start) / n / images * 1000.0


def cam_cost(args, inputs: np.ndarray, load: OtherLoad) -> list[dict]:
    """ms per image of the worker's forward pass with and without the heatmap, per device."""
    from dicom_io import map_to_image
    from trainer.cam import CamTap, hirescam
    from worker.scoring.runner import ModelRunner

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        runner = ModelRunner(args.model, device=device, decode_threads=1)
        try:
            x = batch_of(inputs, args.cam_batch).numpy()
            maps_seen: list[np.ndarray] = []

            def with_cam():
                runner.predict_with_ood(x)
                maps_seen.append(tap.take().cpu().numpy())

            fp32, _ = load_checkpoint(args.model, device)
            xt = torch.from_numpy(x).to(device)

            def forward_fp32():
                with torch.inference_mode():
                    return fp32(xt).float().cpu()

            with_tap, without, autograd, plain = [], [], [], []
            load.mark()
            for _ in range(max(3, args.repeats)):  # alternate, so drift in the machine's load hits both
                tap = CamTap(runner.model)   # the hook on layer4; removed for the model-alone window
                with_tap.append(_ms_per_image(with_cam, len(x), args.min_time, sync))
                tap.remove()
                del maps_seen[:-1]
                without.append(_ms_per_image(lambda: runner.predict_with_ood(x), len(x), args.min_time, sync))
                autograd.append(_ms_per_image(lambda: hirescam(fp32, xt)[0].cpu(), len(x), args.min_time, sync))
                plain.append(_ms_per_image(forward_fp32, len(x), args.min_time, sync))
            one = maps_seen[-1][0]
            upsample = _ms_per_image(lambda: map_to_image(one, 2500, 2048), 1, args.min_time, lambda: None)
            entry = {"device": device, "batch": len(x), "precision": runner.precision,
                     "model_ms_per_image": statistics.median(without),
                     "with_cam_ms_per_image": statistics.median(with_tap),
                     "fp32_forward_ms_per_image": statistics.median(plain),
                     "hirescam_autograd_ms_per_image": statistics.median(autograd),
                     "map_to_image_2500x2048_ms": upsample, "map_shape": list(maps_seen[-1].shape[1:]),
                     "windows": {"with": with_tap, "without": without, "autograd": autograd, "fp32": plain}}
            entry["ratio"] = entry["with_cam_ms_per_image"] / entry["model_ms_per_image"]
            entry["added_ms_per_image"] = entry["with_cam_ms_per_image"] - entry["model_ms_per_image"]
            entry["autograd_ratio"] = entry["hirescam_autograd_ms_per_image"] / entry["fp32_forward_ms_per_image"]
            # the least disturbed window of each: on a shared machine the medians can mix idle and busy windows
            entry["best_ms_per_image"] = {k: min(v) for k, v in entry["windows"].items()}
            best = entry["best_ms_per_image"]
            entry["best_ratio"] = best["with"] / best["without"]
            entry["best_autograd_ratio"] = best["autograd"] / best["fp32"]
            entry["other_load"] = load.share()
            out.append(entry)
        finally:
            runner.close()
    return out


def detector_cost(args, inputs: np.ndarray) -> dict | None:
    """ms per image of the worker's forward pass with and without the out-of-distribution score."""
    from worker.scoring.runner import ModelRunner

    runner = ModelRunner(args.model, device="cpu", decode_threads=1)
    try:
        if runner.detector is None:
            print("\nDETECTOR: the checkpoint has none")
            return None
        x = batch_of(inputs, args.detector_batch).numpy()
        detector, tap = runner.detector, runner._tap

        def window(fn) -> float:
            fn()
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < args.min_time:
                fn()
                n += 1
            return (time.perf_counter() - start) / n / len(x) * 1000.0

        features = torch.randn(len(x), detector.means.shape[1])
        with_ood, without, alone = [], [], []
        for _ in range(max(3, args.repeats)):  # alternate, so drift in the machine's load hits both
            runner.detector, runner._tap = detector, tap
            tap.attach()
            with_ood.append(window(lambda: runner.predict_with_ood(x)))
            tap.remove()  # the model alone: no hook, no distance
            runner.detector, runner._tap = None, None
            without.append(window(lambda: runner.predict_with_ood(x)))
            with torch.inference_mode():
                alone.append(window(lambda: detector.score(features)))
        runner.detector, runner._tap = detector, tap
        tap.attach()
        out = {"batch": len(x), "precision": runner.precision, "model_ms_per_image": statistics.median(without),
               "with_detector_ms_per_image": statistics.median(with_ood),
               "distance_alone_ms_per_image": statistics.median(alone),
               "windows": {"with": with_ood, "without": without, "alone": alone}}
        out["added_ms_per_image"] = out["with_detector_ms_per_image"] - out["model_ms_per_image"]
        out["ratio"] = out["with_detector_ms_per_image"] / out["model_ms_per_image"]
        return out
    finally:
        runner.close()


def deviation_check(fresh: Callable[[], torch.nn.Module], args, threshold: float) -> dict:
    """The worker's CPU default (bf16 autocast, channels_last) against eager fp32 over N real films."""
    t0 = time.perf_counter()
    films = load_real_inputs(args.data, args.deviation_images, seed=1)
    p32 = probabilities(eager(fresh(), False, None), films, args.deviation_batch)
    pbf = probabilities(eager(fresh(), True, torch.bfloat16), films, args.deviation_batch)
    dev = np.abs(pbf - p32)
    out = {"path": "bf16 autocast channels_last", "reference": "eager fp32", "films": int(len(films)),
           "batch": args.deviation_batch, "data": str(args.data), "max_abs_dp": float(dev.max()),
           "mean_abs_dp": float(dev.mean()), "threshold": threshold,
           "flips": int(np.sum((pbf >= threshold) != (p32 >= threshold))),
           "seconds": time.perf_counter() - t0}
    return out


def run_paths(paths, inputs: np.ndarray, batches: list[int], args, p_ref: np.ndarray, ref_labels: np.ndarray,
              threshold: float, load: OtherLoad) -> list[PathResult]:
    results: list[PathResult] = []
    for name, factory, sync, is_compiled in paths:
        res = PathResult(name)
        results.append(res)
        print(f"- {name} ...", flush=True)
        try:
            run, setup, note = factory()
            res.setup_s, res.note = setup, note
        except ImportError as exc:
            res.status, res.note = "skipped", f"not installed: {exc.name} (pip install -e '.[bench]')"
            print(f"  skipped: {res.note}")
            continue
        except Exception as exc:  # noqa: BLE001
            res.status, res.note = "failed", f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"  failed: {res.note}")
            continue
        try:
            devs, flips = [], 0
            load.mark()
            for b in batches:
                x = batch_of(inputs, b)
                if is_compiled:   # the first call compiles for this shape (dynamic=False)
                    start = time.perf_counter()
                    run(x)
                    sync()
                    res.compile_s[b] = time.perf_counter() - start
                res.ips[b], res.spread[b] = time_runner(run, x, args.warmup, args.repeats, args.min_time, sync)
                p = probabilities(run, inputs, b) if b <= len(inputs) else probabilities(run, inputs, len(inputs))
                devs.append(float(np.max(np.abs(p - p_ref))))
                flips = max(flips, int(np.sum((p >= threshold) != ref_labels)))
                extra = f", compile {res.compile_s[b]:.1f} s" if b in res.compile_s else ""
                print(f"  batch {b:>3}: {res.ips[b]:7.1f} images/s (spread {res.spread[b]:.0%}), "
                      f"max|dp| {devs[-1]:.2e}{extra}", flush=True)
            res.max_dev, res.label_flips = max(devs), flips
            res.other_load = load.share()
        except Exception as exc:  # noqa: BLE001 - e.g. inductor cannot compile here: report, go on
            res.status, res.note = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"  failed: {res.note}")
    return results


def report(results: list[PathResult], batches: list[int], args, info: dict, inputs: np.ndarray, minfo,
           busy_notes: list[str], before: float | None, deviation: dict | None, detector: dict | None = None,
           cam: list[dict] | None = None) -> int:

    # ------------------------------------------------------------------------------------- table
    base = next(r for r in results if r.name == "eager fp32")
    print()
    head = f"{'path':<30}" + "".join(f"{'b=' + str(b) + ' img/s':>13}" for b in batches) + \
        "".join(f"{'x fp32 b' + str(b):>11}" for b in batches) + f"{'max|p-p32|':>12}{'<=tol':>7}{'flips':>6}{'others':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        if r.status != "ok":
            print(f"{r.name:<30}  {r.status}: {r.note}")
            continue
        cells = "".join(f"{r.ips.get(b, float('nan')):13.1f}" for b in batches)
        ratios = "".join(f"{r.ips[b] / base.ips[b]:11.2f}" if b in r.ips and base.ips.get(b) else f"{'-':>11}"
                         for b in batches)
        ok = r.max_dev is not None and r.max_dev <= args.tolerance
        others = f"{r.other_load:.0%}" if r.other_load is not None else "?"
        print(f"{r.name:<30}{cells}{ratios}{r.max_dev:12.2e}{'yes' if ok else 'NO':>7}{r.label_flips:>6}"
              f"{others:>8}")
    print("others = CPU share of all cores used by other processes while the path was timed")
    setups = [r for r in results if r.status == "ok" and (r.compile_s or r.setup_s)]
    if setups:
        print("\none-off costs (not in the images/s above):")
        for r in setups:
            parts = []
            if r.setup_s is not None:
                parts.append(f"export+session {r.setup_s:.1f} s")
            if r.compile_s:
                parts.append("first call (compile) " + ", ".join(f"b{b}: {s:.1f} s" for b, s in r.compile_s.items()))
            print(f"  {r.name:<30} " + "; ".join(parts) + (f"  [{r.note}]" if r.note else ""))

    eligible = [r for r in results if r.status == "ok" and r.max_dev is not None and r.max_dev <= args.tolerance]
    best = max(eligible, key=PathResult.geomean) if eligible else None
    print(f"\nreference: eager fp32 at batch 1; tolerance {args.tolerance}; flips = decisions at threshold "
          f"{minfo.threshold:.4f} that differ from fp32 (over {len(inputs)} real images)")
    for b in batches:
        cands = [r for r in eligible if b in r.ips]
        if cands:
            w = max(cands, key=lambda r: r.ips[b])
            print(f"fastest within tolerance at batch {b:>2}: {w.name} ({w.ips[b]:.1f} images/s, "
                  f"{w.ips[b] / base.ips[b]:.2f}x eager fp32)")
    if best:
        print(f"RECOMMENDED DEFAULT: {best.name} (geomean {best.geomean():.1f} images/s = "
              f"{best.geomean() / base.geomean():.2f}x eager fp32; max |p - p_fp32| = {best.max_dev:.2e}, "
              f"{best.label_flips} label flips)")
    if busy_notes:
        print(f"WARNING: other processes used more than {args.busy_threshold:.0%} of the cores; the timings, and the "
              "RECOMMENDED DEFAULT line that ranks them, may be wrong (re-run on an idle machine):")
        for line in busy_notes:
            print("   ", line)
    if deviation:
        print(f"\nDEVIATION CHECK: {deviation['path']} vs {deviation['reference']} over {deviation['films']} real films "
              f"({args.data}, batch {deviation['batch']}): max |p_bf16 - p_fp32| = {deviation['max_abs_dp']:.4f}, "
              f"mean {deviation['mean_abs_dp']:.1e}, {deviation['flips']} decision flips at threshold "
              f"{deviation['threshold']:.4f} ({deviation['seconds']:.0f} s)")
    if detector:
        print(f"\nDETECTOR (worker ModelRunner, {detector['precision']}, batch {detector['batch']}): model alone "
              f"{detector['model_ms_per_image']:.2f} ms/image, with the out-of-distribution score "
              f"{detector['with_detector_ms_per_image']:.2f} ms/image (x{detector['ratio']:.3f}, "
              f"{detector['added_ms_per_image']:+.3f} ms); the distance alone "
              f"{detector['distance_alone_ms_per_image'] * 1000:.1f} us/image; windows (ms/image) with "
              + ", ".join(f"{w:.2f}" for w in detector["windows"]["with"]) + " / without "
              + ", ".join(f"{w:.2f}" for w in detector["windows"]["without"]))
    for c in cam or []:
        print(f"\nCAM {c['device']} (worker ModelRunner, {c['precision']}, batch {c['batch']}): model alone "
              f"{c['model_ms_per_image']:.2f} ms/image, with the heatmap (CamTap, {c['map_shape'][0]}x"
              f"{c['map_shape'][1]} maps to the CPU) {c['with_cam_ms_per_image']:.2f} ms/image (x{c['ratio']:.3f}, "
              f"{c['added_ms_per_image']:+.3f} ms); autograd hirescam fp32 {c['hirescam_autograd_ms_per_image']:.2f} "
              f"ms/image vs fp32 forward {c['fp32_forward_ms_per_image']:.2f} (x{c['autograd_ratio']:.2f}); "
              f"map_to_image to 2500x2048 {c['map_to_image_2500x2048_ms']:.2f} ms; windows (ms/image) with "
              + ", ".join(f"{w:.2f}" for w in c["windows"]["with"]) + " / without "
              + ", ".join(f"{w:.2f}" for w in c["windows"]["without"]))
        b = c["best_ms_per_image"]
        print(f"CAM {c['device']} best windows: model alone {b['without']:.2f}, with the heatmap {b['with']:.2f} ms/image "
              f"(x{c['best_ratio']:.3f}); autograd hirescam {b['autograd']:.2f} vs fp32 forward {b['fp32']:.2f} "
              f"(x{c['best_autograd_ratio']:.2f})" + (f"; WARNING: other processes used {c['other_load']:.0%} of the "
                                                     "cores meanwhile" if c["other_load"] is not None
                                                     and c["other_load"] > args.busy_threshold else ""))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "busy": busy_notes,
                                         "other_load_before": before, "deviation_check": deviation,
                                         "detector": detector, "cam": cam,
                                         "model": str(args.model), "images": len(inputs),
                                         "tolerance": args.tolerance, "batches": batches,
                                         "recommended": best.name if best else None,
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
