"""`cxr-worker`: serve, classify, results, status (+ send, echo: worker/cli/scu.py).

Every subcommand returns an exit code; errors are one line on stderr, never a traceback
(use --debug to see one). Start-up problems (configuration, a flag, a missing or invalid model or
database, a busy port) exit with status 2 and name the setting or flag and the file; failures of
the work itself (a file not scored or not sent) exit with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import socket
import sys
from pathlib import Path

import cxr_config

from ..errors import UnsupportedDependency, WorkerError
from ..logs import setup_logging
from ..settings import NetworkSettings, Settings, SettingsError, load_settings

DESCRIPTION = ("A DICOM worker beside a PACS: receives chest radiographs, scores them for pneumonia and "
               "answers each study with a DICOM Structured Report (TID 1500).")
EPILOG = ("Configuration: config/worker.toml (the defaults), a site file given with --config FILE, then "
          "environment variables CXR_WORKER__SECTION__KEY (e.g. CXR_WORKER__NETWORK__PORT=11113); a "
          "command's flags win over all three. Each command's options: cxr-worker COMMAND --help.")


class StartupError(WorkerError):
    """A command cannot start: a flag, a file or the port; the message names which (exit status 2)."""


def _packaged(dotted: str):
    """A packaged default, for help texts only (its one copy is config/worker.toml)."""
    section, key = dotted.split(".")
    return cxr_config.packaged_defaults("worker")[section][key]


def _settings(args) -> Settings:
    """The configuration with this command's flags (--port, --bind, --data-dir) over it."""
    settings = load_settings(getattr(args, "config", None))
    if getattr(args, "debug", False):
        settings = dataclasses.replace(settings, log_level="DEBUG")
    net = {k: v for k, v in (("port", getattr(args, "port", None)), ("bind_address", getattr(args, "bind", None)))
           if v is not None}
    if net:
        settings = dataclasses.replace(settings, network=dataclasses.replace(settings.network, **net))
    if getattr(args, "http_port", None) is not None:
        settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, port=args.http_port))
    if getattr(args, "data_dir", None) is not None:
        settings = dataclasses.replace(settings, storage=dataclasses.replace(settings.storage,
                                                                             data_dir=Path(args.data_dir)))
    return settings


def check_listen_address(net: NetworkSettings) -> None:
    """Bind (and close) the listening address once before the slow start-up steps, so a busy port
    or a wrong address is one line naming the setting, not an OSError after the model loaded.
    The options are the listener's (pynetdicom binds with SO_REUSEADDR)."""
    if net.port == 0:
        return
    family = socket.AF_INET6 if ":" in net.bind_address else socket.AF_INET
    where = f"{net.bind_address}:{net.port}" if family == socket.AF_INET else f"[{net.bind_address}]:{net.port}"
    how = "with serve --port N, network.port in the --config file or CXR_WORKER__NETWORK__PORT"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((net.bind_address, net.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"network.port: port {net.port} is already in use ({where}: another "
                                   f"cxr-worker or DICOM listener?); choose another {how}") from None
            if exc.errno == errno.EACCES:
                raise StartupError(f"network.port: port {net.port} needs privileges (below 1024: run as root "
                                   f"or grant CAP_NET_BIND_SERVICE); or choose another {how}") from None
            raise StartupError(f"network.bind_address: cannot listen on {where}: {exc.strerror or exc} (set it "
                               "with serve --bind ADDR, network.bind_address or "
                               "CXR_WORKER__NETWORK__BIND_ADDRESS)") from None


def check_http_address(settings: Settings) -> None:
    """The same early check for the HTTP face's address (http.bind_address, http.port)."""
    http = settings.http
    if not http.enabled or http.port == 0:
        return
    family = socket.AF_INET6 if ":" in http.bind_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((http.bind_address, http.port))
        except OSError as exc:
            raise StartupError(f"http.port: cannot listen on {http.bind_address}:{http.port}: "
                               f"{exc.strerror or exc}; choose another with serve --http-port N, http.port in the "
                               "--config file or CXR_WORKER__HTTP__PORT (or http.enabled = false)") from None


def check_model_file(path: Path, source: str) -> None:
    """The checkpoint exists and is a cxr-worker checkpoint (its header only; no torch, no weights)."""
    if not path.is_file():
        raise StartupError(f"{source}: no such model file: {path}")
    from trainer.model_info import read_model_info

    try:
        read_model_info(path)
    except Exception as exc:  # noqa: BLE001 - safetensors, json and our own ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"{source}: {path} is not a cxr-worker model checkpoint (.safetensors written by "
                           f"cxr-train): {detail}") from None


def cmd_serve(args) -> int:
    settings = _settings(args)
    # The quick checks first: the port and the model file, before torch is imported (seconds) and the
    # model loaded.
    check_listen_address(settings.network)
    check_http_address(settings)
    check_model_file(settings.model.path, "model.path")
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
    check_model_file(path, "--model" if args.model else "model.path")  # before importing torch
    if args.batch_size is not None and args.batch_size < 1:
        raise StartupError(f"--batch-size: must be >= 1, got {args.batch_size}")
    from ..heatmap.overlay import film_box
    from ..scoring.runner import ModelRunner

    heatmaps = getattr(args, "heatmap", None) is not None
    return ModelRunner(path, args.device or m.device, args.precision or m.precision, args.batch_size or m.batch_size,
                       m.decode_threads, heatmaps=heatmaps,
                       preview_box=film_box(_settings(args).heatmap.key_image_size) if heatmaps else None)


def cmd_classify(args) -> int:
    setup_logging("DEBUG" if args.debug else "WARNING")
    from . import classify

    from ..scoring.intended_use import IntendedUse, site_values

    heatmap_dir = None
    if args.heatmap is not None:
        heatmap_dir = Path(args.heatmap)
        try:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"--heatmap: cannot create {heatmap_dir}: {exc.strerror}") from None
    runner = classify_runner(args)
    use = IntendedUse.resolve(site_values(_settings(args).intended_use), runner.info.intended_use)
    try:
        return classify.run([str(p) for p in args.paths], runner, args.json, use=use, heatmap_dir=heatmap_dir,
                            heatmap_size=_settings(args).heatmap.key_image_size)
    finally:
        runner.close()


def _database(args):
    """The worker's database for reading: never created here. A missing SQLite file is a StartupError
    naming the path and how to point elsewhere."""
    from ..store.db import Database

    settings = _settings(args)
    url = settings.storage.url
    if url.startswith("sqlite") and "///" in url:
        path = Path(url.split("///", 1)[1])
        if str(path) != ":memory:" and not path.is_file():
            key = "storage.database_url" if settings.storage.database_url else "storage.data_dir"
            raise StartupError(
                f"{key}: no worker database at {path} (nothing was created). Run this command where "
                f"`cxr-worker serve` runs (storage.data_dir is relative to the current directory), or point to "
                f"its data directory with --data-dir DIR, storage.data_dir in a --config file or "
                f"CXR_WORKER__STORAGE__DATA_DIR")
    return Database(url, settings.storage.sqlite_busy_timeout_ms, create=False)


def _reading(db, report) -> int:
    """Run a read-only report; a database without the worker's tables is one line, not a traceback."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        return report()
    except (OperationalError, ProgrammingError) as exc:
        where = db.engine.url.render_as_string(hide_password=True)
        detail = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise StartupError(f"storage: cannot read the worker database {where}: {detail}") from None
    finally:
        db.dispose()


def cmd_results(args) -> int:
    from .reports import print_results

    setup_logging("WARNING")
    db = _database(args)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    return _reading(db, lambda: print_results(db, fmt, args.limit))


def cmd_status(args) -> int:
    from .reports import print_status

    setup_logging("WARNING")
    db = _database(args)
    return _reading(db, lambda: print_status(db, args.json))


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", metavar="FILE", help="site TOML file over config/worker.toml (environment "
                                                     "variables CXR_WORKER__SECTION__KEY override both)")
    return p


def _data_dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="the worker's data directory: spool, SRs and the SQLite "
                                                     f"database (default: storage.data_dir, "
                                                     f"{_packaged('storage.data_dir')})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-worker", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks (may show patient data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = with_config(sub.add_parser(
        "serve", help="run the DICOM listener, scorer and SR sender",
        description="Listen for DICOM associations (C-ECHO, C-STORE of chest radiographs), score each complete "
        "study and send its SR to the configured destinations, until SIGTERM or Ctrl-C. As packaged it listens "
        f"on {_packaged('network.bind_address')}:{_packaged('network.port')} (every interface), without TLS, "
        "for any calling AE title: set network.bind_address, network.allowed_calling_aets and [tls] before "
        "exposing it (docs/worker.md, Configuration).",
        epilog=EPILOG))
    serve.add_argument("--port", type=int, metavar="N",
                       help=f"DICOM port to listen on (default: network.port, {_packaged('network.port')})")
    serve.add_argument("--bind", metavar="ADDR", help="address to listen on, e.g. 127.0.0.1 for this machine "
                                                      f"only (default: network.bind_address, "
                                                      f"{_packaged('network.bind_address')} = every interface)")
    serve.add_argument("--http-port", type=int, metavar="N",
                       help=f"HTTP port of /healthz, /readyz, /metrics and the pages (default: http.port, "
                            f"{_packaged('http.port')}; http.enabled = false turns it off)")
    _data_dir_argument(serve)
    serve.set_defaults(func=cmd_serve)

    classify = with_config(sub.add_parser(
        "classify", help="score DICOM/JPEG/PNG files offline (one line per file)",
        description="Score files offline with the server's own scoring code: one line per file (path, "
        "probability, label) or one JSON object per line. Exit 1 when a file could not be scored."))
    classify.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (walked recursively)")
    classify.add_argument("--model", metavar="FILE", help="checkpoint (.safetensors) (default: model.path; "
                                                          "\"\" there = the shipped model)")
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    classify.add_argument("--device", choices=("auto", "cpu", "cuda"),
                          help="where the model runs; auto = CUDA when available (default: model.device)")
    classify.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                          help="arithmetic of the forward pass; auto = fp16 on CUDA, bf16 on a CPU with native "
                               "bf16, fp32 otherwise (default: model.precision)")
    classify.add_argument("--batch-size", type=int, metavar="N",
                          help="images per forward pass (default: model.batch_size)")
    classify.add_argument("--heatmap", metavar="DIR",
                          help="also write each assessed file's heatmap overlay (HiResCAM, the key image's "
                               "picture) as DIR/<file name>.png; created if missing")
    classify.set_defaults(func=cmd_classify)

    results = with_config(sub.add_parser(
        "results", help="list study results from the database",
        description="The study results in the worker's database, newest first (read only: a missing "
        "database is an error, never created)."))
    fmt = results.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    results.add_argument("--limit", type=int, metavar="N", help="newest N results only")
    _data_dir_argument(results)
    results.set_defaults(func=cmd_results)

    status = with_config(sub.add_parser(
        "status", help="queue depths, model, outbox and recent errors",
        description="Studies per state, instances, the outbox, the models used and the latest errors (read "
        "only: a missing database is an error, never created)."))
    status.add_argument("--json", action="store_true", help="one JSON object")
    _data_dir_argument(status)
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
        if args.debug:
            raise
        print(f"cxr-worker {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        if args.debug:
            raise
        print(f"cxr-worker {args.command}: {exc}", file=sys.stderr)
        return 2
    except UnsupportedDependency as exc:
        if args.debug:
            raise
        print(f"cxr-worker: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if args.debug:
            raise
        print(f"cxr-worker {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
