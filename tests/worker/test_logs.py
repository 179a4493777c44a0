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
