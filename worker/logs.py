"""Logging without patient data: the formatter and filter used above DEBUG, and their set-up.

No patient name, ID or birth date may reach a log above DEBUG (docs/worker.md "Security"). Two
routes could carry them: exception messages (pydicom quotes the value it could not convert:
"Unable to convert '<birth date>' to 'DA' object") and pydicom's validation warnings ("Invalid value
for VR DA: '<birth date>'"). Below DEBUG verbosity the first keep their frames but lose their
messages, the second lose their quoted text.
"""

from __future__ import annotations

import logging
import re
import sys
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


def setup_logging(level: str) -> None:
    """Root logging to stderr at ``level``; above DEBUG with the guards above in place."""
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr, format=FORMAT)
    if level != "DEBUG":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(NoPatientDataFormatter(FORMAT))
        logging.getLogger("pydicom").addFilter(QuotedValueFilter())
        # pydicom logs each warning and also warns() it to stderr, unfiltered: keep the log copy only.
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
