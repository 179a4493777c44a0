"""Errors that say why a file cannot become model input."""

from __future__ import annotations


class DicomInputError(ValueError):
    """The file cannot be turned into a chest radiograph model input.

    ``reason`` is a short machine-friendly code (stored in the database, e.g. ``no_pixel_data``);
    the message is the human explanation. Callers record both and move on: one bad file must
    never stop a batch or a listener.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
