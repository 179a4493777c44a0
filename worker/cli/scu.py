"""`cxr-worker send` and `cxr-worker echo`: the DICOM client side of the command line.

worker/cli/main.py calls register(subparsers); each subcommand sets func=handler(args) -> exit code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from dicom_io.images import is_image_file

from ..net import install as install_pynetdicom
from ..net.scu import echo_detail, store_files
from ..settings import load_settings
from .wrap import content_seed, wrap_image_as_dicom

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The peer defaults to this machine's worker, as configured (config/worker.toml, --config, then
    CXR_WORKER__NETWORK__* like `serve`): see resolve_peer."""
    parser.add_argument("--config", metavar="FILE", help="site TOML file the peer defaults come from "
                                                         "(env CXR_WORKER__SECTION__KEY overrides it)")
    parser.add_argument("--host", help="peer host (default: network.bind_address, 127.0.0.1 when it is 0.0.0.0)")
    parser.add_argument("--port", type=int, help="peer DICOM port (default: network.port)")
    parser.add_argument("--aec", help="called AE title (default: network.ae_title)")
    parser.add_argument("--aet", help="our (calling) AE title (default: network.ae_title, as the worker's own "
                                      "deliveries)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="network timeout (default: 30)")
    tls = parser.add_argument_group("DICOM TLS (any --tls-* option implies --tls)")
    tls.add_argument("--tls", action="store_true", help="use TLS; the peer's certificate is verified")
    tls.add_argument("--tls-ca", default="", metavar="FILE", help="CA certificates (PEM) for the peer (default: system CAs)")
    tls.add_argument("--tls-cert", default="", metavar="FILE", help="our client certificate (PEM), if the peer wants one")
    tls.add_argument("--tls-key", default="", metavar="FILE", help="its private key (PEM, unencrypted)")


def resolve_peer(args: argparse.Namespace) -> None:
    """Fill --host/--port/--aec/--aet not given from [network]; the configuration is read (and
    validated) only when one of them is missing."""
    if None not in (args.host, args.port, args.aec, args.aet):
        return
    net = load_settings(args.config).network
    args.host = net.local_address if args.host is None else args.host
    args.port = net.port if args.port is None else args.port
    args.aec = net.ae_title if args.aec is None else args.aec
    args.aet = net.ae_title if args.aet is None else args.aet


def _tls_context(args: argparse.Namespace):
    """The client SSLContext for --tls/--tls-* (worker/net/tls.py), or None; SettingsError for bad files."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from ..net.tls import client_context

    return client_context(args.tls_ca, args.tls_cert, args.tls_key, names=("--tls-ca", "--tls-cert", "--tls-key"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `send` and `echo` subcommands."""
    send = subparsers.add_parser(
        "send",
        help="C-STORE DICOM files (or, with --wrap, JPEG/PNG chest films) to a DICOM node",
        description="Send files over one association. Directories are expanded (with --recursive, "
        "into subdirectories). The peer defaults to this machine's worker as configured ([network]: the "
        "same configuration as serve). Exits 1 if any file was not stored. With --wrap, a JPEG/PNG film "
        "becomes a DX image whose study, series and instance UIDs are derived from the file's content "
        "(SHA-256): sending the same film again is a duplicate of the same instance, never a second "
        "study; --new-study gives it fresh random UIDs instead.",
    )
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    _add_peer_arguments(send)
    send.add_argument("--wrap", action="store_true", help="wrap JPEG/PNG files as DICOM DX images first (UIDs "
                                                          "from the file's content: a resend is a duplicate)")
    send.add_argument("--new-study", action="store_true", help="with --wrap: random UIDs, so each send of a "
                                                               "film is a new study (and a new result)")
    send.add_argument("--recursive", "-r", action="store_true", help="descend into subdirectories")
    send.add_argument("--no-progress", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    ping = subparsers.add_parser("echo", help="C-ECHO a DICOM node (exit 0 when it answers Success)",
                                 description="C-ECHO a DICOM node: by default this machine's worker as "
                                 "configured ([network], the same configuration as serve). Exits 0 when it "
                                 "answers Success, 1 otherwise.")
    _add_peer_arguments(ping)
    ping.set_defaults(func=cmd_echo)


def expand_paths(paths: Iterable[Path], recursive: bool) -> tuple[list[Path], list[str]]:
    """Files named or found in the directories (sorted, hidden files skipped), and error lines."""
    files: list[Path] = []
    errors: list[str] = []
    for path in paths:
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files.extend(sorted(p for p in found if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or directory")
    return files, errors


def _wrap_all(files: Sequence[Path], tmpdir: Path, new_study: bool = False
              ) -> tuple[list[Path], dict[Path, Path], list[str]]:
    """Replace image files by wrapped DICOM copies in tmpdir; returns (to send, wrapped->original, errors).
    Their UIDs come from the file's content (random with ``new_study``)."""
    to_send: list[Path] = []
    origin: dict[Path, Path] = {}
    errors: list[str] = []
    for index, path in enumerate(files):
        if not is_image_file(path):
            to_send.append(path)
            continue
        try:
            ds = wrap_image_as_dicom(path, uid_seed=None if new_study else content_seed(path))
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the rest
            errors.append(f"{path}: cannot wrap as DICOM: {exc}")
            continue
        target = tmpdir / f"{index:06d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        to_send.append(target)
        origin[target] = path
    return to_send, origin, errors


def cmd_send(args: argparse.Namespace) -> int:
    install_pynetdicom()  # files go out as stored; an untested pynetdicom version stops here (exit 2)
    resolve_peer(args)
    files, errors = expand_paths(args.paths, args.recursive)
    if not files and not errors:
        print("send: no files to send", file=sys.stderr)
        return EXIT_USAGE
    if args.new_study and not args.wrap:
        print("send: --new-study applies to --wrap only (DICOM files are sent as they are)", file=sys.stderr)
        return EXIT_USAGE
    tls = _tls_context(args)
    with tempfile.TemporaryDirectory(prefix="cxr-send-") as tmp:
        origin: dict[Path, Path] = {}
        if args.wrap:
            files, origin, wrap_errors = _wrap_all(files, Path(tmp), args.new_study)
            errors.extend(wrap_errors)
        with _Progress(len(files), args.aec, enabled=not args.no_progress) as bar:
            outcomes = store_files(files, args.host, args.port, args.aec, args.aet, tls=tls, timeout=args.timeout,
                                   on_outcome=bar.outcome)
            bar.finish(outcomes)
    for outcome in outcomes:
        if not outcome.ok:
            errors.append(_failure_line(outcome, origin.get(outcome.path, outcome.path), args.wrap))
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    sent = sum(o.ok for o in outcomes)
    failed = len(errors)
    print(f"sent {sent}, failed {failed}")
    return EXIT_OK if failed == 0 else EXIT_FAILED


#: How worker/net/scu.py words a file it could not parse as DICOM (its header read).
_UNREADABLE = "not a readable DICOM file"


def _failure_line(outcome, name: Path, wrapped: bool) -> str:
    """One error line for a file not stored, named as the user gave it (not its wrapped copy)."""
    if outcome.status is None and (outcome.error or "").startswith(_UNREADABLE):
        # pydicom's own message ends with "Use force=True to force reading", which a CLI user cannot act on
        hint = "" if wrapped else "; for a JPEG/PNG film use --wrap" if is_image_file(name) else \
            "; JPEG/PNG films can be sent with --wrap"
        return f"{name}: not a DICOM file (no DICOM header){hint}"
    line = str(outcome).replace(str(outcome.path), str(name), 1)
    if not wrapped and is_image_file(name):
        line += " (an image file: use --wrap)"
    return line


class _Progress:
    """The progress bar of `send`: it counts stored files only, so a failed send never ends at 100 %;
    failures are shown beside it."""

    def __init__(self, total: int, called_aet: str, *, enabled: bool) -> None:
        self.bar = None
        self.failed = 0
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", desc=f"C-STORE {called_aet}")

    def outcome(self, outcome) -> None:
        if self.bar is None:
            return
        if outcome.ok:
            self.bar.update(1)
        else:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed)

    def finish(self, outcomes) -> None:
        """Files refused before any association (e.g. not DICOM) are counted as failed too."""
        if self.bar is not None:
            failed = sum(not o.ok for o in outcomes)
            if failed:
                self.bar.set_postfix(failed=failed)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_echo(args: argparse.Namespace) -> int:
    resolve_peer(args)
    status, reason = echo_detail(args.host, args.port, args.aec, args.aet, tls=_tls_context(args), timeout=args.timeout)
    where = f"{args.aec}@{args.host}:{args.port}"
    if status is None:
        print(f"C-ECHO {where} failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    print(f"C-ECHO {where}: status 0x{status:04X}")
    return EXIT_OK if status == 0 else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.cli.scu`: send and echo alone (without the worker's other commands)."""
    parser = argparse.ArgumentParser(prog="cxr-worker")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
