"""Is the heatmap faithful to the model? Two checks of trainer/cam.py on real validation films.

``cxr-train faithfulness --model FILE --data ROOT`` (docs/heatmaps-faithfulness.md has the method,
the numbers of the shipped model and what they do not show).

**Deletion.** Each film's map (HiResCAM: ``CamTap`` for ResNet18's pooled linear head, ``hirescam``
through autograd otherwise), upsampled to the 224 x 224 model input with ``dicom_io.map_to_image``,
ranks the pixels; the top ``fraction`` (10 %) are replaced by a strongly blurred copy of the same
film (Gaussian, sigma ``BLUR_SIGMA`` = 10 px at 224, reflected at the border), and the drop of the
pneumonia logit and of the calibrated probability (``ModelInfo.calibrate``) is measured. Two
baselines delete the same number of pixels: the top of a *random map of the same smoothness*
(Gaussian noise on the same h x w grid, upsampled the same way, so the deleted area is as
contiguous as the real one) and uniformly random pixels; each is drawn ``draws`` times per film and
its drops averaged. The per-film paired difference (map minus baseline) gets a bootstrap 95 %
interval of its mean, the share of films where the map's drop is larger, and a one-sided Wilcoxon
signed-rank p. Positives are where a drop means something; negatives are reported beside them.

**Model randomisation** (Adebayo et al., NeurIPS 2018, cascading): the model's top-level blocks are
re-initialised from the output backwards (ResNet18: fc, then layer4, layer3, ...; each stage keeps
the earlier ones randomised) with a fixed seed (``reset_parameters`` of every layer in the block,
batch-norm statistics included), the maps computed again, and the Spearman rank correlation
between each film's real and randomised map reported, on the raw h x w map and on its ``relevance``
(ReLU / own max, what is displayed). A map that explains the model must change when the model does.
As a reference, the same correlation against pure noise maps (what "unrelated" looks like at 7 x 7).

Pure torch / numpy / scipy; the films come through the trainer's own loader (trainer/data.py
``load_images``: dicom_io's resize, the trainer's ``to_input`` normalisation) from the
patient-grouped validation split of train (``grouped_split``, the training seed and fraction; the
Kaggle test split is never read). Inference is fp32, no autocast, so the figures are the model's
and not a precision's; ``precision_check`` then compares the maps the worker computes under its
autocast (bf16 on CPUs with native bf16, fp16 on CUDA) with the fp32 ones.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from scipy.ndimage import gaussian_filter
from scipy.special import expit
from torch import nn

from dicom_io import INPUT_SIZE, map_to_image

from .cam import CamTap, hirescam, linear_head, relevance
from .checkpoint import ModelInfo, load_checkpoint
from .data import fingerprint, grouped_split, load_images, scan_split
from .engine import iterate_batches, to_input

log = logging.getLogger("cxr_train")

#: The shipped model (a file path; the trainer does not import the worker).
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "worker" / "models" / "default.safetensors"
#: Share of the 224 x 224 pixels deleted.
FRACTION = 0.10
#: Sigma (pixels at 224) of the blurred copy that replaces the deleted pixels: about a rib's spacing
#: in a child's film, so an opacity's texture and edges are gone but the mean grey level stays.
BLUR_SIGMA = 10.0
#: Random maps / random pixel sets per film for each baseline (their drops are averaged).
DRAWS = 4
#: Bootstrap resamples of the per-film paired differences.
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------------ films
@dataclass
class Films:
    """Validation films: uint8 (N, 224, 224) as the trainer decodes them, labels (N,), paths."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]

    def inputs(self) -> np.ndarray:
        """float32 (N, 1, 224, 224): the model input, by the trainer's ``to_input``."""
        return to_input(torch.from_numpy(self.images).unsqueeze(1)).numpy()


def validation_films(data_root: str | Path, info: ModelInfo, *, val_fraction: float, seed: int, positives: int,
                     negatives: int, sample_seed: int = 0, limit: int = 0) -> Films:
    """``positives`` PNEUMONIA and ``negatives`` NORMAL films drawn (``sample_seed``) from the
    patient-grouped validation split of ROOT/train that the model was selected on."""
    if positives < 1 or negatives < 0:
        raise ValueError(f"positives must be >= 1 and negatives >= 0, got {positives}, {negatives}")
    files = scan_split(Path(data_root) / "train")
    if limit:  # a model trained with --limit: the same subset (train.py)
        from .train import _balanced_limit
        files = files.subset(_balanced_limit(files.labels, limit, seed))
    if info.data_fingerprint and fingerprint(files) != info.data_fingerprint:
        raise ValueError(f"{data_root}/train is not the data the model was trained on: the validation split would "
                         "differ (pass the model's --limit, --seed and --val-fraction)")
    _, val_idx = grouped_split(files, val_fraction, seed)
    rng = np.random.default_rng(sample_seed)
    chosen = []
    for label, n, name in ((1, positives, "positives"), (0, negatives, "negatives")):
        pool = val_idx[files.labels[val_idx] == label]
        if n > len(pool):
            raise ValueError(f"{name} = {n}, but the validation split has {len(pool)} such films")
        chosen.append(np.sort(rng.choice(pool, n, replace=False)))
    idx = np.concatenate(chosen)
    subset = files.subset(idx)
    images, _ = load_images(subset, None, progress=False)
    return Films(images, subset.labels, subset.paths)


# ------------------------------------------------------------------------------------- the model
def logits_of(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits (N,) float64 of model inputs (N, 1, 224, 224), fp32."""
    out = []
    with torch.inference_mode():
        for part in iterate_batches(len(x), batch_size):
            out.append(model(torch.from_numpy(x[part]).to(device)).float().reshape(-1).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def maps_and_logits(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device,
                    autocast: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HiResCAM maps (N, h, w) float32 and logits (N,) float64: ``CamTap`` in the scoring forward
    pass when the model has a pooled linear head, ``hirescam`` (autograd) otherwise; fp32 unless
    ``autocast`` names a dtype (CamTap path only: the worker's scoring precision)."""
    maps, logits = [], []
    tap = CamTap(model) if linear_head(model) is not None else None
    try:
        for part in iterate_batches(len(x), batch_size):
            batch = torch.from_numpy(x[part]).to(device)
            if tap is not None:
                ctx = (torch.autocast(device.type, dtype=autocast) if autocast is not None
                       else contextlib.nullcontext())
                with torch.inference_mode(), ctx:
                    out = model(batch).float().reshape(-1)
                cam = tap.take()
            else:
                cam, out = hirescam(model, batch)
            maps.append(cam.cpu())
            logits.append(out.cpu())
    finally:
        if tap is not None:
            tap.remove()
    return torch.cat(maps).numpy(), torch.cat(logits).numpy().astype(np.float64)


def upsample(maps: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Maps (N, h, w) -> (N, size, size) over the model input, by ``dicom_io.map_to_image``."""
    return np.stack([map_to_image(m, size, size) for m in maps]) if len(maps) else np.zeros((0, size, size))


# -------------------------------------------------------------------------------------- deletion
def top_fraction_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """bool (N, H, W): exactly round(fraction * H * W) pixels per film, those with the largest values."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    n = values.shape[0]
    flat = values.reshape(n, -1)
    k = max(1, round(fraction * flat.shape[1]))
    idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    mask = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask.reshape(values.shape)


def blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """Each film (N, 1, H, W) blurred by a Gaussian of ``sigma`` pixels (reflected at the border)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect").astype(np.float32)


def delete(x: np.ndarray, mask: np.ndarray, blur: np.ndarray) -> np.ndarray:
    """The films with the masked pixels (mask (N, H, W)) taken from the blurred copy."""
    return np.where(mask[:, None], blur, x).astype(np.float32)


@dataclass
class Deletion:
    """Logits (float64) of each film before and after deleting: by its map (N,), by ``draws`` random
    smooth maps (N, draws), by ``draws`` sets of uniformly random pixels (N, draws); and ``claimed``
    (N,), the logit the map itself attributes to the pixels it deleted (its cells are shares of the
    logit: the upsampled map summed over them, times cells / pixels), what a drop would be if the
    model were additive over its cells and the blur removed all their evidence."""

    labels: np.ndarray
    original: np.ndarray
    by_map: np.ndarray
    by_smooth_random: np.ndarray
    by_random_pixels: np.ndarray
    claimed: np.ndarray

    def drops(self, scale: str, info: ModelInfo) -> dict[str, np.ndarray]:
        """Per-film drops (N,) on ``scale`` "logit" or "probability" (calibrated); baselines averaged
        over their draws."""
        if scale not in ("logit", "probability"):
            raise ValueError(f"scale must be 'logit' or 'probability', got {scale!r}")
        f = (lambda z: z) if scale == "logit" else (lambda z: calibrated(info, z))
        base = f(self.original)
        return {"map": base - f(self.by_map),
                "smooth_random": (base[:, None] - f(self.by_smooth_random)).mean(axis=1),
                "random_pixels": (base[:, None] - f(self.by_random_pixels)).mean(axis=1)}


def calibrated(info: ModelInfo, logits: np.ndarray) -> np.ndarray:
    """Calibrated probabilities, the worker's: ModelInfo.calibrate of the sigmoid."""
    raw = expit(np.asarray(logits, dtype=np.float64))
    return np.vectorize(info.calibrate, otypes=[np.float64])(raw) if raw.size else raw


def deletion_test(model: nn.Module, x: np.ndarray, labels: np.ndarray, *, fraction: float = FRACTION,
                  sigma: float = BLUR_SIGMA, draws: int = DRAWS, seed: int = 0, batch_size: int = 16,
                  device: torch.device | str = "cpu") -> Deletion:
    """Delete the top ``fraction`` of each film's map, of random smooth maps and random pixels."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    maps, original = maps_and_logits(model, x, batch_size, device)
    blur = blurred(x, sigma)
    size = x.shape[-1]

    def after(values: np.ndarray) -> np.ndarray:
        return logits_of(model, delete(x, top_fraction_mask(values, fraction), blur), batch_size, device)

    up = upsample(maps, size)
    mask = top_fraction_mask(up, fraction)
    claimed = (up * mask).sum(axis=(1, 2)) * (maps.shape[1] * maps.shape[2]) / (size * size)
    by_map = logits_of(model, delete(x, mask, blur), batch_size, device)
    smooth = np.stack([after(upsample(rng.standard_normal(maps.shape).astype(np.float32), size))
                       for _ in range(draws)], axis=1)
    pixels = np.stack([after(rng.random((len(x), size, size))) for _ in range(draws)], axis=1)
    return Deletion(np.asarray(labels), original, by_map, smooth, pixels, claimed.astype(np.float64))


def paired(ours: np.ndarray, theirs: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Per-film paired comparison of two drops: mean difference with a bootstrap 95 % interval, the
    share of films where ours is larger, one-sided Wilcoxon signed-rank p (ours > theirs)."""
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    if not len(diff):
        return {"films": 0}
    boot = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    out = {"films": int(len(diff)), "mean_difference": float(diff.mean()),
           "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
           "share_larger": float(np.mean(diff > 0))}
    out["wilcoxon_p"] = (float(stats.wilcoxon(diff, alternative="greater").pvalue)
                         if len(diff) >= 2 and np.any(diff != 0) else None)
    return out


def summarise_deletion(result: Deletion, info: ModelInfo, seed: int = 0) -> dict[str, Any]:
    """Mean drops and the paired comparisons, for positives and negatives, on both scales."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for group, label in (("positives", 1), ("negatives", 0)):
        sel = result.labels == label
        if not sel.any():
            continue
        entry: dict[str, Any] = {"films": int(sel.sum()),
                                 "mean_logit": float(result.original[sel].mean()),
                                 "mean_probability": float(calibrated(info, result.original[sel]).mean()),
                                 "mean_claimed_logit": float(result.claimed[sel].mean())}
        for scale in ("logit", "probability"):
            d = {k: v[sel] for k, v in result.drops(scale, info).items()}
            entry[scale] = {"mean_drop": {k: float(v.mean()) for k, v in d.items()},
                            "median_drop": {k: float(np.median(v)) for k, v in d.items()},
                            "map_vs_smooth_random": paired(d["map"], d["smooth_random"], rng),
                            "map_vs_random_pixels": paired(d["map"], d["random_pixels"], rng)}
        out[group] = entry
    return out


# ---------------------------------------------------------------------------- model randomisation
def cascade_stages(model: nn.Module) -> list[str]:
    """The model's top-level blocks that have parameters, from the output backwards
    (ResNet18: fc, layer4, layer3, layer2, layer1, bn1, conv1; SimpleCNN: classifier, features)."""
    return [name for name, child in reversed(list(model.named_children()))
            if any(True for _ in child.parameters())]


def reinitialise(module: nn.Module, seed: int) -> None:
    """Every layer of ``module`` back to its initialisation (``reset_parameters``), reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()


def spearman_per_film(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho (N,) between paired maps (N, h, w); NaN where either map is constant."""
    out = np.full(len(a), np.nan)
    for i, (u, v) in enumerate(zip(a.reshape(len(a), -1), b.reshape(len(b), -1))):
        if np.ptp(u) > 0 and np.ptp(v) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[i] = float(stats.spearmanr(u, v).statistic)
    return out


def rho_summary(rho: np.ndarray) -> dict[str, Any]:
    """Mean, spread (std, 10th/90th percentile) and mean |rho| of the defined values."""
    ok = rho[np.isfinite(rho)]
    if not len(ok):
        return {"films": int(len(rho)), "defined": 0}
    return {"films": int(len(rho)), "defined": int(len(ok)), "mean": float(ok.mean()), "std": float(ok.std()),
            "q10": float(np.quantile(ok, 0.1)), "median": float(np.median(ok)), "q90": float(np.quantile(ok, 0.9)),
            "min": float(ok.min()), "mean_abs": float(np.abs(ok).mean())}


def randomisation_check(model: nn.Module, x: np.ndarray, labels: np.ndarray, *, stages: int | None = None,
                        seed: int = 0, batch_size: int = 16,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Cascading randomisation: rank correlation of real and randomised maps per stage, per class."""
    device = torch.device(device)
    labels = np.asarray(labels)
    real, _ = maps_and_logits(model, x, batch_size, device)
    real_rel = relevance(real)
    names = cascade_stages(model)
    if stages is not None:
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        names = names[:stages]
    groups = [(g, labels == lab) for g, lab in (("positives", 1), ("negatives", 0)) if np.any(labels == lab)]

    def by_group(rho_cam: np.ndarray, rho_rel: np.ndarray) -> dict[str, Any]:
        return {g: {"cam": rho_summary(rho_cam[sel]), "relevance": rho_summary(rho_rel[sel])} for g, sel in groups}

    noise = np.random.default_rng(seed).standard_normal(real.shape).astype(np.float32)
    out: dict[str, Any] = {"map_shape": list(real.shape[1:]), "seed": seed,
                           "reference_noise": by_group(spearman_per_film(real, noise),
                                                       spearman_per_film(real_rel, relevance(noise))),
                           "stages": []}
    randomised = copy.deepcopy(model).to(device).eval()
    for i, name in enumerate(names):
        reinitialise(getattr(randomised, name), seed + i)
        maps, _ = maps_and_logits(randomised, x, batch_size, device)
        out["stages"].append({"stage": name, "randomised": names[:i + 1],
                              **by_group(spearman_per_film(real, maps), spearman_per_film(real_rel, relevance(maps)))})
    return out


# ------------------------------------------------------------------------------------- precision
def worker_autocast(device: torch.device) -> torch.dtype | None:
    """The worker's "auto" scoring precision on ``device`` (worker/scoring/runner.py resolve_precision):
    fp16 autocast on CUDA, bf16 on a CPU with native bf16, else None (fp32: nothing to compare)."""
    from .models import cpu_supports_bf16

    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def precision_check(model: nn.Module, x: np.ndarray, *, batch_size: int = 16,
                    device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The maps the worker computes under its autocast against fp32 (CamTap models only): Spearman
    rho per film, the largest |relevance| difference, and whether the strongest cell moves."""
    device = torch.device(device)
    dtype = worker_autocast(device)
    if dtype is None or linear_head(model) is None:
        return None
    real, logits = maps_and_logits(model, x, batch_size, device)
    low, low_logits = maps_and_logits(model, x, batch_size, device, autocast=dtype)
    flat_a, flat_b = real.reshape(len(real), -1), low.reshape(len(low), -1)
    return {"autocast": str(dtype).removeprefix("torch."), "films": int(len(x)),
            "rho": rho_summary(spearman_per_film(real, low)),
            "max_abs_relevance_difference": float(np.abs(relevance(real) - relevance(low)).max()),
            "strongest_cell_moved": int(np.sum(flat_a.argmax(axis=1) != flat_b.argmax(axis=1))),
            "max_abs_logit_difference": float(np.abs(logits - low_logits).max())}


# ------------------------------------------------------------------------------------------ run
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def faithfulness(model_path: str | Path, data_root: str | Path, *, positives: int, negatives: int,
                 val_fraction: float, seed: int, fraction: float = FRACTION, sigma: float = BLUR_SIGMA,
                 draws: int = DRAWS, stages: int | None = None, sample_seed: int = 0, batch_size: int = 16,
                 device: str = "auto", limit: int = 0) -> dict[str, Any]:
    """Both checks of ``model_path`` on validation films of ``data_root``; a JSON-able report."""
    start = time.perf_counter()
    dev = resolve_device(device)
    model, info = load_checkpoint(model_path, dev)
    films = validation_films(data_root, info, val_fraction=val_fraction, seed=seed, positives=positives,
                             negatives=negatives, sample_seed=sample_seed, limit=limit)
    x = films.inputs()
    log.info("faithfulness: %d positive and %d negative validation films on %s", positives, negatives, dev)
    deletion = deletion_test(model, x, films.labels, fraction=fraction, sigma=sigma, draws=draws, seed=sample_seed,
                             batch_size=batch_size, device=dev)
    randomisation = randomisation_check(model, x, films.labels, stages=stages, seed=sample_seed,
                                        batch_size=batch_size, device=dev)
    precision = precision_check(model, x, batch_size=batch_size, device=dev)
    return {
        "model": {"path": str(model_path), "name": info.name, "version": info.version, "arch": info.arch,
                  "map": "HiResCAM, closed form (CamTap)" if linear_head(model) is not None
                  else "HiResCAM, autograd (hirescam)"},
        "films": {"positives": positives, "negatives": negatives, "sample_seed": sample_seed,
                  "split": f"patient-grouped validation split of {data_root}/train (val_fraction {val_fraction}, "
                           f"seed {seed})"},
        "method": {"fraction": fraction, "blur_sigma_px": sigma, "input_size": int(x.shape[-1]), "draws": draws,
                   "bootstrap": BOOTSTRAP, "precision": "fp32", "device": str(dev)},
        "deletion": summarise_deletion(deletion, info, sample_seed),
        "randomisation": randomisation,
        "precision": precision,
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the CLI's tables."""
    m, f, meth = report["model"], report["films"], report["method"]
    lines = [f"model {m['name']} {m['version']} ({m['arch']}), map: {m['map']}",
             f"films: {f['positives']} positive + {f['negatives']} negative, {f['split']}",
             f"deletion: top {meth['fraction']:.0%} of the {meth['input_size']}x{meth['input_size']} pixels "
             "replaced by a "
             f"Gaussian blur (sigma {meth['blur_sigma_px']:g} px); baselines averaged over {meth['draws']} draws; "
             f"{meth['precision']} on {meth['device']}", ""]
    head = (f"{'films':<14}{'scale':<12}{'drop: map':>11}{'smooth rnd':>11}{'rnd pixels':>11}"
            f"{'map-smooth [95% CI]':>28}{'map>smooth':>11}{'p':>9}{'map>pixels':>11}")
    lines += [head, "-" * len(head)]
    for group, entry in report["deletion"].items():
        for scale in ("logit", "probability"):
            e = entry[scale]
            md, vs, vp = e["mean_drop"], e["map_vs_smooth_random"], e["map_vs_random_pixels"]
            ci = f"{vs['mean_difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]"
            p = f"{vs['wilcoxon_p']:.1e}" if vs.get("wilcoxon_p") is not None else "-"
            lines.append(f"{group + ' ' + str(entry['films']):<14}{scale:<12}{md['map']:11.3f}"
                         f"{md['smooth_random']:11.3f}{md['random_pixels']:11.3f}{ci:>28}"
                         f"{vs['share_larger']:11.0%}{p:>9}{vp['share_larger']:11.0%}")
    lines += ["(mean drops, original minus after deletion; probability = calibrated; map>X = share of films where the "
              "map's drop is larger; p = one-sided Wilcoxon signed-rank, map vs smooth random)"]
    lines += [f"mean before deletion: {g} logit {e['mean_logit']:+.2f}, calibrated probability "
              f"{e['mean_probability']:.3f}; the map's own share of the logit in the deleted pixels "
              f"{e['mean_claimed_logit']:+.2f}" for g, e in report["deletion"].items()]
    lines.append("")
    r = report["randomisation"]
    head = (f"{'randomised (cascading)':<24}{'films':<11}{'rho cam mean':>13}{'std':>7}{'q10..q90':>15}{'|rho|':>7}"
            f"{'rho relevance':>15}{'std':>7}{'|rho|':>7}{'defined':>9}")
    lines += [f"model randomisation: Spearman rho between real and randomised {r['map_shape'][0]}x{r['map_shape'][1]} "
              "maps per film (rho relevance: of ReLU/max, what is displayed; defined: films whose maps are not "
              "constant)", head, "-" * len(head)]
    rows = [("reference: noise maps", r["reference_noise"])] + [
        (s["randomised"][0] if len(s["randomised"]) == 1 else f"{s['randomised'][0]}..{s['randomised'][-1]}", s)
        for s in r["stages"]]
    for name, entry in rows:
        for group in ("positives", "negatives"):
            if group not in entry:
                continue
            c, v = entry[group]["cam"], entry[group]["relevance"]
            if not c.get("defined"):
                continue
            rel = (f"{v['mean']:15.3f}{v['std']:7.3f}{v['mean_abs']:7.3f}" if v.get("defined")
                   else f"{'-':>15}{'':>14}")
            spread = f"{c['q10']:+.2f}..{c['q90']:+.2f}"
            lines.append(f"{name:<24}{group:<11}{c['mean']:13.3f}{c['std']:7.3f}{spread:>15}{c['mean_abs']:7.3f}{rel}"
                         f"{v.get('defined', 0):>5}/{v['films']}")
    pc = report.get("precision")
    if pc:
        lines += ["", f"precision: the worker's {pc['autocast']} autocast maps vs fp32 over {pc['films']} films: "
                  f"Spearman rho mean {pc['rho']['mean']:.4f}, min over films {pc['rho'].get('min', float('nan')):.4f}; "
                  "max |relevance "
                  f"difference| {pc['max_abs_relevance_difference']:.3f}; strongest cell moved on "
                  f"{pc['strongest_cell_moved']} films; max |logit difference| {pc['max_abs_logit_difference']:.3f}"]
    lines.append(f"({report['seconds']:.0f} s)")
    return "\n".join(lines)
