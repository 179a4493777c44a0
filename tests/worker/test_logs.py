"""The guards that keep patient data out of logs above DEBUG (worker/logs.py).

tests/system/test_security.py checks a real worker's INFO log; these are the paths it cannot
provoke on demand.
"""

from __future__ import annotations

import logging
import sys

from worker.logs import NoPatientDataFormatter, QuotedValueFilter

PHI_ID = "PID-Ø-730518"
PHI_BIRTH = "19230405"


def test_log_formatting_hides_values_below_debug():
    """The two guards behind the test above, for the paths it cannot provoke on demand: a traceback
    keeps its frames but not its messages, and pydicom's quoted values are hidden."""
    try:
        try:
            raise KeyError(PHI_ID)
        except KeyError as exc:
            raise ValueError(f"Unable to convert '{PHI_BIRTH}' to 'DA' object") from exc
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "SR could not be built", None, sys.exc_info())
    text = NoPatientDataFormatter("%(message)s").format(record)
    assert "SR could not be built" in text and "ValueError" in text and "KeyError" in text
    assert "test_log_formatting_hides_values_below_debug" in text  # frames kept
    assert PHI_BIRTH not in text and PHI_ID not in text
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "Invalid value for VR %s: %r.",
                               ("DA", "05.04.1923"), None)
    assert QuotedValueFilter().filter(record)
    assert record.getMessage() == "Invalid value for VR DA: <value hidden>."


_CHILD = """
import os, time, warnings
from worker.logs import setup_child_logging
setup_child_logging("INFO")
os.write(2, b"gdcm-like native warning about 'PID-730518'\\n")   # what C code writes to fd 2
warnings.warn("a library warning quoting 'PID-730518'", RuntimeWarning)  # not pydicom: py.warnings
time.sleep(0.5)  # the drain thread logs the native line
"""


def test_child_logging_routes_native_stderr_and_warnings_through_the_formatter():
    """A decode process's native stderr lines and Python warnings become formatted records, value hidden."""
    import re
    import subprocess

    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING "
    assert re.search(stamp + r"cxr_worker\.decoder: decoder output: gdcm-like native warning about <value hidden>$",
                     done.stderr, re.MULTILINE), done.stderr
    assert re.search(stamp + r"py\.warnings: .*RuntimeWarning: a library warning quoting <value hidden>", done.stderr,
                     re.MULTILINE), done.stderr
    assert "730518" not in done.stderr
