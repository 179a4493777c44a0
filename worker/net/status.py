"""DICOM status codes the worker answers and understands: one home, over ``pynetdicom.status``.

pynetdicom's tables give each code its category and meaning; the worker names the few it uses here,
and maps its receive errors (worker/errors.py) to C-STORE statuses in one place (``store_status``).
"""

from __future__ import annotations

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from ..errors import DiskFull, NotDurable, ReceiveError, Unreadable

#: Success (PS3.4 Annex B and PS3.7 C).
SUCCESS = 0x0000
#: Storage: Refused, Out of Resources: "could not be made durable, try again".
OUT_OF_RESOURCES = 0xA700
#: Storage: Error, Cannot Understand: the data set could not be parsed.
CANNOT_UNDERSTAND = 0xC000
#: The storage warnings (coercion of data elements, elements discarded, data set does not match SOP
#: class): the peer kept the instance.
STORAGE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
#: Processing Failure (PS3.7 C.4): an N-EVENT-REPORT we could not take now.
PROCESSING_FAILURE = 0x0110
#: C-STORE statuses that mean the peer kept the instance.
ACCEPTED = frozenset({SUCCESS, *STORAGE_WARNINGS})

_STATUS_OF = {Unreadable: CANNOT_UNDERSTAND, DiskFull: OUT_OF_RESOURCES, NotDurable: OUT_OF_RESOURCES}


def store_status(error: ReceiveError) -> int:
    """The C-STORE status that tells the sender about ``error``."""
    for kind, status in _STATUS_OF.items():
        if isinstance(error, kind):
            return status
    return OUT_OF_RESOURCES  # an unnamed receive error: not durable, the sender retries


def describe(status: int) -> str:
    """'0xA700 (Failure: Refused: Out of Resources)'-style text for logs and CLI output."""
    category = code_to_category(status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (category, ""))[1]
    return f"0x{status:04X} ({category}{': ' + meaning if meaning else ''})"
