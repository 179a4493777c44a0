"""Keep pynetdicom's requestor reactor away from our C-STORE responses.

pynetdicom 3.0.x: ``send_c_store()`` pauses the association's reactor thread by clearing
``_reactor_checkpoint`` and waiting for ``_is_paused``. The reactor sets ``_is_paused = True``
just *before* ``checkpoint.wait()``; if it has already passed the wait when the checkpoint is
cleared, it goes on to ``dimse.get_msg(block=False)`` and can take our C-STORE-RSP off the queue
("Received unexpected C-STORE service message"). The send then waits the whole DIMSE timeout and
the association is aborted. Under GIL contention (scorer, decoders, SCP threads) this happens:
``benchmarks/scu_race.py`` lost 83 of 320 stores without this guard and none with it.

The guard parks the reactor for the whole batch of sends: its checkpoint is replaced by one that
ignores ``set()`` until the batch is over, and we wait until the reactor is really parked.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from pynetdicom.association import Association

PARK_TIMEOUT_S = 1.0
"""How long to wait for the reactor to reach its checkpoint (one loop is ~1 ms)."""
SETTLE_S = 0.005
"""``_is_paused`` must still be true this long after first seen: a full reactor loop has passed."""


class _ParkedCheckpoint(threading.Event):
    """A reactor checkpoint that stays cleared until ``release()``, whatever pynetdicom sets."""

    def __init__(self) -> None:
        super().__init__()
        self._held = True

    def set(self) -> None:
        if not self._held:
            super().set()

    def release(self) -> None:
        self._held = False
        super().set()


@contextmanager
def reactor_parked(assoc: Association) -> Iterator[None]:
    """While inside, only our own send_*() calls read the association's DIMSE messages."""
    original = assoc._reactor_checkpoint
    checkpoint = _ParkedCheckpoint()
    assoc._reactor_checkpoint = checkpoint
    try:
        deadline = time.monotonic() + PARK_TIMEOUT_S
        while time.monotonic() < deadline:
            if assoc._is_paused:
                time.sleep(SETTLE_S)
                if assoc._is_paused:
                    break
            time.sleep(0.001)
        yield
    finally:
        assoc._reactor_checkpoint = original
        original.set()
        checkpoint.release()  # wake a reactor blocked on the parked checkpoint
