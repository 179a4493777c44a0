"""Logging without patient data: the formatter and filter used above DEBUG, and their set-up.

No patient name, ID or birth date may reach a log above DEBUG (docs/worker.md "Security"). Two
routes could carry them: exception messages (pydicom quotes the value it could not convert:
"Unable to convert '<birth date>' to 'DA' object") and pydicom's validation warnings ("Invalid value
for VR DA: '<birth date>'"). Below DEBUG verbosity the first keep their frames but lose their
messages, the second lose their quoted text.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries whose own logging is turned down unless level is DEBUG: pynetdicom logs PDUs and data
#: sets (patient data) at DEBUG and is chatty at INFO; highdicom narrates every attribute copy at INFO.
QUIET_LIBRARIES = ("pynetdicom", "highdicom")

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _exception_name(te: traceback.TracebackException) -> str:
    name = getattr(te, "exc_type_str", None)  # Python >= 3.13
    if name is None:
        kind = te.exc_type
        module = getattr(kind, "__module__", "builtins")
        name = kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    return name


class NoPatientDataFormatter(logging.Formatter):
    """Tracebacks keep their frames, chain and exception types, but not the exception messages.

    Written on traceback's public API (TracebackException.stack, __cause__, __context__,
    __suppress_context__), in the order and wording Python prints a chain.
    """

    HIDDEN = "<message hidden: it may quote patient data; logging.level = \"DEBUG\" shows it>"

    def formatException(self, ei) -> str:
        parts: list[str] = []
        seen: set[int] = set()

        def walk(te: traceback.TracebackException | None) -> None:
            if te is None or id(te) in seen:
                return
            seen.add(id(te))
            if te.__cause__ is not None:
                walk(te.__cause__)
                parts.append(_CAUSE)
            elif te.__context__ is not None and not te.__suppress_context__:
                walk(te.__context__)
                parts.append(_CONTEXT)
            if te.stack:
                parts.append("Traceback (most recent call last):\n")
                parts.extend(te.stack.format())
            parts.append(f"{_exception_name(te)}: {self.HIDDEN}\n")

        walk(traceback.TracebackException(*ei, capture_locals=False))
        return "".join(parts).rstrip("\n")


class QuotedValueFilter(logging.Filter):
    """pydicom's validation warnings quote the offending value: quoted text in a message becomes
    <value hidden>."""

    QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = self.QUOTED.sub("<value hidden>", message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


#: Loggers whose messages may quote a data element's value: pydicom's own, Python warnings
#: (logging.captureWarnings) and what the decoders write to the decode processes' stderr.
QUOTING_LOGGERS = ("pydicom", "py.warnings", "cxr_worker.decoder")


def setup_logging(level: str) -> None:
    """Root logging to stderr at ``level``; above DEBUG with the guards above in place.

    Python warnings go through logging too (``py.warnings``), so a warning is formatted and filtered
    like every other message, whichever module raised it.
    """
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr, format=FORMAT)
    logging.captureWarnings(True)
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(NoPatientDataFormatter(FORMAT))
        for name in QUOTING_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, QuotedValueFilter) for f in logger.filters):
                logger.addFilter(QuotedValueFilter())
        # pydicom logs each warning and also warns() it: keep the log copy (logger "pydicom") only.
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def setup_child_logging(level: str) -> None:
    """In a decode process (spawned: it inherits no logging set-up): the parent's ``level`` and guards,
    and whatever native code (gdcm, the codecs) writes to file descriptor 2 logged line by line as
    ``cxr_worker.decoder`` instead of reaching the log raw.

    The log itself goes to a duplicate of the original stderr (the parent's log); fd 2 becomes a pipe
    that a daemon thread reads. Python's own sys.stderr is the duplicate too, so logging never writes
    into the pipe it is draining.
    """
    real_fd = os.dup(2)
    sys.stderr = os.fdopen(real_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    setup_logging(level)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    decoder_log = logging.getLogger("cxr_worker.decoder")

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace").rstrip()
                if line:
                    try:
                        decoder_log.warning("decoder output: %s", line)
                    except Exception:  # noqa: BLE001 - the drain must keep draining, or writers block
                        pass

    threading.Thread(target=drain, name="stderr-drain", daemon=True).start()
