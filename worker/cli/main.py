"""`cxr-worker`: serve, classify, results, status (+ send, echo from worker/cli/scu.py).

Every subcommand returns an exit code; errors are one line on stderr, never a traceback
(use --debug / logging.level = "DEBUG" to see one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UnsupportedDependency
from ..logs import setup_logging
from ..settings import Settings, SettingsError, load_settings


def _settings(args) -> Settings:
    settings = load_settings(getattr(args, "config", None))
    if getattr(args, "debug", False):
        settings = Settings(**{**settings.__dict__, "log_level": "DEBUG"})
    return settings


def cmd_serve(args) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level)
    from ..service import Service

    service = Service(settings)
    return service.run_forever()


def classify_runner(args):
    """The model runner for `classify`: [model] of the configuration (packaged TOML, --config,
    environment) like every command, its flags over it. Decoding on threads (model.decode_processes
    and model.torch_threads are for `serve`)."""
    m = _settings(args).model
    path = Path(args.model) if args.model else m.path
    if not path.is_file():  # fail fast, before importing torch
        raise FileNotFoundError(f"model checkpoint not found: {path}" + ("" if args.model else " (model.path)"))
    from ..scoring.runner import ModelRunner

    return ModelRunner(path, args.device or m.device, args.precision or m.precision, args.batch_size or m.batch_size,
                  m.decode_threads)


def cmd_classify(args) -> int:
    setup_logging("DEBUG" if args.debug else "WARNING")
    from . import classify

    runner = classify_runner(args)
    try:
        return classify.run([str(p) for p in args.paths], runner, args.json)
    finally:
        runner.close()


def _database(args):
    from ..store.db import Database

    settings = _settings(args)
    return Database(settings.storage.url, settings.storage.sqlite_busy_timeout_ms)


def cmd_results(args) -> int:
    from .reports import print_results

    setup_logging("WARNING")
    db = _database(args)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    try:
        return print_results(db, fmt, args.limit)
    finally:
        db.dispose()


def cmd_status(args) -> int:
    from .reports import print_status

    setup_logging("WARNING")
    db = _database(args)
    try:
        return print_status(db, args.json)
    finally:
        db.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks (may show patient data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="site TOML file (overrides config/worker.toml; "
                                                         "env CXR_WORKER__SECTION__KEY overrides both)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the DICOM listener, scorer and SR sender"))
    serve.set_defaults(func=cmd_serve)

    classify = with_config(sub.add_parser("classify", help="score DICOM/JPEG/PNG files offline (one line per file)"))
    classify.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    classify.add_argument("--model", metavar="FILE", help="checkpoint (default: model.path, \"\" = the shipped model)")
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    classify.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: model.device")
    classify.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="default: model.precision")
    classify.add_argument("--batch-size", type=int, help="default: model.batch_size")
    classify.set_defaults(func=cmd_classify)

    results = with_config(sub.add_parser("results", help="list study results from the database"))
    fmt = results.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    results.add_argument("--limit", type=int, help="newest N results only")
    results.set_defaults(func=cmd_results)

    status = with_config(sub.add_parser("status", help="queue depths, model, outbox and recent errors"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    from . import scu as cli_scu

    cli_scu.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SettingsError as exc:
        print(f"cxr-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except UnsupportedDependency as exc:
        print(f"cxr-worker: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if args.debug:
            raise
        print(f"cxr-worker {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
