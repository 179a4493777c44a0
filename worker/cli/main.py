"""`cxr-worker`: serve, classify, results, status (+ send, echo from worker/cli_scu.py).

Every subcommand returns an exit code; errors are one line on stderr, never a traceback
(use --debug / logging.level = "DEBUG" to see one).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
import warnings
from pathlib import Path

from ..settings import Settings, SettingsError, load_settings

log = logging.getLogger("cxr_worker")


class NoPatientDataFormatter(logging.Formatter):
    """Below DEBUG verbosity, tracebacks keep their frames but not the exception messages: those can
    quote DICOM values, i.e. patient data (pydicom: "Unable to convert '<birth date>' to 'DA' object")."""

    HIDDEN = "<message hidden: it may quote patient data; logging.level = \"DEBUG\" shows it>"

    def formatException(self, ei) -> str:
        te = traceback.TracebackException(*ei, capture_locals=False)
        seen, todo = set(), [te]
        while todo:
            item = todo.pop()
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            item._str = self.HIDDEN  # what format_exception_only prints after the type name
            todo += [item.__cause__, item.__context__]
        return "".join(te.format()).rstrip("\n")


class QuotedValueFilter(logging.Filter):
    """pydicom's validation warnings quote the offending value ("Invalid value for VR DA: '<birth
    date>'"): below DEBUG verbosity, quoted text in its messages is replaced by <value hidden>."""

    QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = self.QUOTED.sub("<value hidden>", message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # no patient data in logs above DEBUG (docs/worker.md "Security")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(NoPatientDataFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pydicom").addFilter(QuotedValueFilter())
        # pydicom logs each warning and also warns() it to stderr, unfiltered: keep the log copy only.
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    # pynetdicom logs PDUs and data sets (patient data) at DEBUG, and is chatty at INFO.
    # highdicom narrates every attribute copy at INFO.
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


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


def cmd_classify(args) -> int:
    setup_logging("DEBUG" if args.debug else "WARNING")
    if args.model and not Path(args.model).is_file():  # fail fast, before importing torch
        raise FileNotFoundError(f"model checkpoint not found: {args.model}")
    from . import classify
    from ..scoring.runner import Scorer

    settings = load_settings(args.config) if args.config else None
    m = settings.model if settings else None
    scorer = Scorer(args.model or (m.path if m else None), args.device or (m.device if m else "auto"),
                    args.precision or (m.precision if m else "auto"),
                    args.batch_size or (m.batch_size if m else 16), m.decode_threads if m else 2)
    try:
        return classify.run([str(p) for p in args.paths], scorer, args.json)
    finally:
        scorer.close()


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

    classify = sub.add_parser("classify", help="score DICOM/JPEG/PNG files offline (one line per file)")
    classify.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    classify.add_argument("--model", metavar="FILE", help="checkpoint (default: the shipped model)")
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    classify.add_argument("--device", choices=("auto", "cpu", "cuda"))
    classify.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    classify.add_argument("--batch-size", type=int)
    classify.add_argument("--config", metavar="FILE", help="take model settings from this site file")
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

    try:
        from . import scu as cli_scu
    except ImportError as exc:  # pragma: no cover - only while cli_scu is being written
        log.debug("send/echo unavailable: %s", exc)
    else:
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
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if args.debug:
            raise
        print(f"cxr-worker {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
