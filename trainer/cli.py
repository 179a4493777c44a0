"""``cxr-train``: train a model on the Kaggle layout, or evaluate a checkpoint on a labelled folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cxr_config

from .augment import AugmentSettings

SUBCOMMANDS = ("train", "evaluate", "fit-ood", "faithfulness")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once, where it tells something: not for on/off flags (their help says what the
    flag changes), not for empty defaults, not where the help already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or action.default in ("", None) or "default" in text):
            return text
        return super()._get_help_string(action)


def _train_parser(sub: argparse._SubParsersAction, defaults: dict) -> None:
    d, t, a = defaults["data"], defaults["train"], defaults["augment"]
    p = sub.add_parser("train", help="train a model (the default subcommand)",
                       description="Train SimpleCNN or ResNet18 from scratch on ROOT/train/{NORMAL,PNEUMONIA}. "
                       "Validation is a patient-grouped, class-stratified split of train; the test split is "
                       "never used for selection. Run under `torchrun --nproc_per_node N -m trainer` for DDP.",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--data", default=d["root"], help="dataset root (Kaggle layout)")
    p.add_argument("--arch", default=t["arch"], choices=["resnet18", "simplecnn"], help="architecture")
    p.add_argument("--epochs", type=int, default=t["epochs"], help="maximum epochs")
    p.add_argument("--batch-size", type=int, default=t["batch_size"], help="batch size per process")
    p.add_argument("--lr", type=float, default=t["lr"], help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--weight-decay", type=float, default=t["weight_decay"], help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=t["seed"], help="seed for the split, init and augmentation")
    p.add_argument("--patience", type=int, default=t["patience"], help="early-stopping patience (epochs)")
    p.add_argument("--amp", default=t["amp"], choices=["auto", "off"], help="mixed precision")
    p.add_argument("--output", "-o", default=t["output"], help="output directory")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="fraction of patients for validation")
    p.add_argument("--cache-dir", default=d["cache_dir"], help="decoded-image cache (default: OUTPUT/cache)")
    p.add_argument("--min-sensitivity", type=float, default=defaults["threshold"]["min_sensitivity"],
                   help="threshold rule: best specificity with validation sensitivity >= this")
    p.add_argument("--full-precision", dest="half", action="store_false", default=t["half"],
                   help="save fp32 weights instead of fp16 (default: "
                   f"{'fp16' if t['half'] else 'fp32'} weights, train.half)")
    p.add_argument("--limit", type=int, default=0, help="use a stratified subset of this many files (smoke tests; 0 = all)")
    p.add_argument("--name", default="", help="model name (default: cxr-pneumonia-ARCH)")
    p.add_argument("--model-version", default="1.0.0", help="model version string")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (default: shown)")
    for key, value in a.items():
        p.add_argument(f"--aug-{key.replace('_', '-')}", dest=f"aug_{key}", type=float, default=value,
                       help=f"augmentation: {key.replace('_', ' ')}")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics and plots of a checkpoint on a labelled folder",
                       description="Score a labelled folder DIR/{NORMAL,PNEUMONIA} (e.g. ROOT/test) with a checkpoint at its "
                       "stored threshold; write metrics.json and the plots.",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint (.safetensors); the shipped one is worker/models/default.safetensors")
    p.add_argument("--data", required=True, help="folder with NORMAL/ and PNEUMONIA/ subfolders")
    p.add_argument("--output", "-o", default="runs/evaluate", help="output directory")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (default: shown)")


def _fit_ood_parser(sub: argparse._SubParsersAction, defaults: dict) -> None:
    d, t, o = defaults["data"], defaults["train"], defaults["ood"]
    p = sub.add_parser("fit-ood", help="give a checkpoint an out-of-distribution detector and a calibrator",
                       description="Fit the Mahalanobis detector on the train split's penultimate features, its "
                       "threshold and the calibrator on the patient-grouped validation split (the same split "
                       "training used), and write a new model version: same weights, new version and model UID, "
                       "the intended use of config/train.toml [intended_use].",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--model", required=True, help="checkpoint to extend (.safetensors)")
    p.add_argument("--data", default=d["root"], help="dataset root (Kaggle layout) the model was trained on")
    p.add_argument("--out", default="", help="new checkpoint (default: MODEL with the new version in its name)")
    p.add_argument("--model-version", default="", help="new version (default: the next minor version)")
    p.add_argument("--ood", default="", help="folder of out-of-distribution files: compare detectors by AUROC")
    p.add_argument("--report-dir", default="", help="write ood_report.json and calibration.png here")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="as in training")
    p.add_argument("--seed", type=int, default=t["seed"], help="the training seed (the split)")
    p.add_argument("--cache-dir", default=d["cache_dir"] or "runs/cache", help="decoded-image cache")
    p.add_argument("--target-rejection", type=float, default=o["target_rejection"],
                   help="share of validation films the detector may decline")
    p.add_argument("--calibration", default=o["calibration"], choices=["platt", "temperature"], help="calibrator")
    p.add_argument("--limit", type=int, default=0, help="the --limit the model was trained with (0 = all)")


def _faithfulness_parser(sub: argparse._SubParsersAction, defaults: dict) -> None:
    from .faithfulness import BLUR_SIGMA, DRAWS, FRACTION, SHIPPED_MODEL
    d, t = defaults["data"], defaults["train"]
    p = sub.add_parser("faithfulness", help="is the heatmap faithful? deletion and model-randomisation checks",
                       description="On validation films of the patient-grouped split of ROOT/train (never the "
                       "test split): delete (blur) the top pixels of each film's HiResCAM map and compare the drop "
                       "of the logit and calibrated probability with random maps of the same smoothness and random "
                       "pixels; re-initialise the model's top blocks (cascading) and report the rank correlation "
                       "of real and randomised maps. docs/heatmaps-faithfulness.md",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--model", default=str(SHIPPED_MODEL), help="checkpoint (default: the shipped model)")
    p.add_argument("--data", default=d["root"], help="dataset root (Kaggle layout) the model was trained on")
    p.add_argument("--n", type=int, default=100, help="PNEUMONIA validation films (the claim is about these)")
    p.add_argument("--negatives", type=int, default=-1, help="NORMAL validation films (default: half of --n)")
    p.add_argument("--fraction", type=float, default=FRACTION, help="share of the 224x224 pixels deleted")
    p.add_argument("--sigma", type=float, default=BLUR_SIGMA, help="Gaussian blur of the deleted pixels (px at 224)")
    p.add_argument("--draws", type=int, default=DRAWS, help="random maps / pixel sets per film for each baseline")
    p.add_argument("--stages", type=int, default=0, help="randomisation stages from the output back (0 = all blocks)")
    p.add_argument("--sample-seed", type=int, default=0, help="which validation films, and the random baselines")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="as in training")
    p.add_argument("--seed", type=int, default=t["seed"], help="the training seed (the split)")
    p.add_argument("--limit", type=int, default=0, help="the --limit the model was trained with (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs (fp32)")
    p.add_argument("--json", default="", help="also write the report as JSON here")


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-train", description=(
        "Offline (re)training and evaluation of the cxr-worker pneumonia models. Defaults come from "
        "config/train.toml, a file given with --config, and CXR_TRAIN__SECTION__KEY variables."),
        epilog="train is the default subcommand (`cxr-train --epochs 5` = `cxr-train train --epochs 5`). "
        "Every option: cxr-train train --help, cxr-train evaluate --help, cxr-train fit-ood --help, "
        "cxr-train faithfulness --help.")
    parser.add_argument("--config", metavar="FILE", help="site TOML file overriding config/train.toml")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub, defaults)
    _evaluate_parser(sub)
    _fit_ood_parser(sub, defaults)
    _faithfulness_parser(sub, defaults)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """`cxr-train --arch x` means `cxr-train train --arch x`."""
    if any(arg in SUBCOMMANDS for arg in argv) or any(arg in ("-h", "--help") for arg in argv[:1]):
        return argv
    # keep global options (--config FILE, -v) before the implied subcommand
    head: list[str] = []
    rest = list(argv)
    while rest and rest[0] in ("--config", "-v", "--verbose"):
        head.append(rest.pop(0))
        if head[-1] == "--config" and rest:
            head.append(rest.pop(0))
    return head + ["train"] + rest


def main(argv: list[str] | None = None) -> int:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = cxr_config.load("train", "CXR_TRAIN", known.config)
    args = build_parser(defaults).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "evaluate":
        from .evaluate_cli import evaluate_folder
        metrics = evaluate_folder(args.model, args.data, args.output, args.batch_size, args.progress)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "fit-ood":
        from .fit_ood import fit_ood, next_version
        from .model_info import read_model_info
        version = args.model_version or next_version(read_model_info(args.model).version)
        model = Path(args.model)
        out = args.out or str(model.with_name(f"{model.stem}-{version}{model.suffix}"))
        report = fit_ood(args.model, args.data, out, val_fraction=args.val_fraction, seed=args.seed,
                         cache_dir=args.cache_dir, intended_use=defaults["intended_use"],
                         target_rejection=args.target_rejection, calibration_method=args.calibration,
                         version=version, ood_dir=args.ood or None, report_dir=args.report_dir or None,
                         limit=args.limit)
        report["ood"].get("ood_set", {}).pop("scores", None)
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "faithfulness":
        from .faithfulness import faithfulness, format_report
        report = faithfulness(args.model, args.data, positives=args.n,
                              negatives=args.n // 2 if args.negatives < 0 else args.negatives,
                              val_fraction=args.val_fraction, seed=args.seed, fraction=args.fraction,
                              sigma=args.sigma, draws=args.draws, stages=args.stages or None,
                              sample_seed=args.sample_seed, batch_size=args.batch_size, device=args.device,
                              limit=args.limit)
        print(format_report(report))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0
    from .train import TrainSettings, train
    settings = TrainSettings(
        data_root=args.data, output=args.output, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, patience=args.patience, amp=args.amp,
        half=args.half, val_fraction=args.val_fraction, cache_dir=args.cache_dir,
        min_sensitivity=args.min_sensitivity, limit=args.limit, model_name=args.name,
        model_version=args.model_version, progress=args.progress, intended_use=defaults["intended_use"],
        ood_target_rejection=defaults["ood"]["target_rejection"], calibration=defaults["ood"]["calibration"],
        augment=AugmentSettings(**{k: getattr(args, f"aug_{k}") for k in defaults["augment"]}))
    if not (Path(args.data) / "train").is_dir():
        print(f"cxr-train: {args.data}/train not found (expected the Kaggle layout)", file=sys.stderr)
        return 2
    train(settings)
    return 0
