"""Keep pynetdicom's requestor reactor away from our C-STORE responses, and quiet while idle.

pynetdicom 3.0.x: ``send_c_store()`` pauses the association's reactor thread by clearing
``_reactor_checkpoint`` and waiting for ``_is_paused``. The reactor sets ``_is_paused = True``
just *before* ``checkpoint.wait()``; if it has already passed the wait when the checkpoint is
cleared, it goes on to ``dimse.get_msg(block=False)`` and can take our C-STORE-RSP off the queue
("Received unexpected C-STORE service message"). The send then waits the whole DIMSE timeout and
the association is aborted. Under GIL contention (scorer, decoders, SCP threads) this happens:
``benchmarks/scu_race.py`` lost 83 of 320 stores without this guard and none with it.

The guard replaces the checkpoint with a ``_Gate`` that knows when the reactor is inside its
``wait()`` (``_is_paused`` cannot tell a reactor about to wait from one that has just passed the
wait). ``reactor_parked`` holds the gate closed (pynetdicom's own ``set()`` cannot open it)
and returns once the reactor is inside the wait, so from then until the end of the batch only our
``send_*()`` calls read the association's messages. While parked, ``dimse.get_msg`` also gives up
as soon as the peer aborts or closes the connection, instead of waiting the whole DIMSE timeout.

An association kept open between deliveries (worker/net/associations.py) is *not* parked while
idle, so its reactor still answers the peer's A-RELEASE-RQ and notices an A-ABORT or a closed
connection; pynetdicom's network idle timeout is off meanwhile (the pool releases idle associations
itself). ``reactor_idle`` slows its two threads down: each polls every 1 ms, ~55 ms of CPU
per idle second on the project's 2-core VM (a wake-up costs 50-200 us there), and one look every
``IDLE_POLL_S`` costs ~4 ms/s. Both pauses are waits on the gate's condition, so
``reactor_awake`` ends them at once: the next C-STORE does not wait for a sleeping DUL. The DUL's
pause sits in ``assoc._dul_ready.is_set()``, which pynetdicom's DUL loop calls once per turn and
nothing else calls once the association is up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pynetdicom.association import Association

PARK_TIMEOUT_S = 1.0
"""How long to wait for the reactor to reach its checkpoint (one loop is ~1 ms; an idle pause ends
as soon as the gate is held)."""
SETTLE_S = 0.005
"""How often a waiting park() looks whether the reactor thread has ended instead."""
IDLE_POLL_S = 0.1
"""An idle kept association's reactor and DUL look at the peer this often (pynetdicom: every 1 ms)."""
ABORT_POLL_S = 0.05
"""While waiting for a response, look this often whether the peer aborted or closed the connection."""


class _Gate(threading.Event):
    """The association's reactor checkpoint, under our control.

    ``set()``/``clear()`` behave as pynetdicom expects, except that a parked gate stays closed
    whatever is set; ``pace`` > 0 makes every ``wait()`` first pause that long (idle association).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Condition(threading.Lock())
        self._open = True
        self._held = False
        self._inside = False
        self.pace = 0.0
        self.network_timeout: float | None = None  # the association's, while idle (then None)

    def is_set(self) -> bool:
        return self._open and not self._held

    def set(self) -> None:
        with self._lock:
            self._open = True
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._inside = True
            self._lock.notify_all()
            try:
                if self.pace:
                    self._lock.wait_for(lambda: self._held or not self.pace, self.pace)
                return self._lock.wait_for(lambda: self._open and not self._held, timeout)
            finally:
                self._inside = False

    def park(self, assoc: Association) -> None:
        """Close the gate and return once the reactor waits at it (or has ended)."""
        deadline = time.monotonic() + PARK_TIMEOUT_S
        with self._lock:
            self._held = True
            self._lock.notify_all()
            while not self._inside and assoc.is_alive() and not assoc._kill and time.monotonic() < deadline:
                self._lock.wait(SETTLE_S)

    def unpark(self) -> None:
        with self._lock:
            self._held = False
            self._lock.notify_all()

    def set_pace(self, pace: float) -> None:
        with self._lock:
            self.pace = pace
            self._lock.notify_all()

    def idle_pause(self) -> None:
        """The DUL's pause at the top of its loop while idle; ends early when woken."""
        with self._lock:
            if self.pace:
                self._lock.wait_for(lambda: not self.pace, self.pace)


class _DulPacer(threading.Event):
    """Stands in for ``assoc._dul_ready`` (set for good once the DUL runs): pauses the DUL loop."""

    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        super().set()
        self._gate = gate

    def is_set(self) -> bool:
        self._gate.idle_pause()
        return True


def _gate(assoc: Association) -> _Gate:
    gate = assoc._reactor_checkpoint
    if not isinstance(gate, _Gate):
        gate = _Gate()
        if not assoc._reactor_checkpoint.is_set():
            gate.clear()
        assoc._reactor_checkpoint = gate
    return gate


def association_ending(assoc: Association) -> bool:
    """The peer aborted, asked to release or closed the connection (seen by the DUL, not yet handled)."""
    return assoc.dul.peek_next_pdu() is not None or not assoc.dul.is_alive()


def _abort_aware_get_msg(assoc: Association):
    """dimse.get_msg that returns (None, None) as soon as the association is ending."""
    dimse = assoc.dimse

    def get_msg(block: bool = False):
        if not block:
            return type(dimse).get_msg(dimse, block=False)
        timeout = dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = ABORT_POLL_S if deadline is None else min(ABORT_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return None, None
            try:
                return dimse.msg_queue.get(block=True, timeout=left)
            except queue.Empty:
                if association_ending(assoc):
                    return None, None

    return get_msg


@contextmanager
def reactor_parked(assoc: Association) -> Iterator[None]:
    """While inside, only our own send_*() calls read the association's DIMSE messages, and a
    wait for a response ends as soon as the peer aborts, releases or closes the connection."""
    gate = _gate(assoc)
    gate.park(assoc)
    assoc.dimse.get_msg = _abort_aware_get_msg(assoc)
    try:
        yield
    finally:
        del assoc.dimse.get_msg  # back to the class's method
        gate.unpark()


def reactor_idle(assoc: Association, poll: float = IDLE_POLL_S) -> None:
    """Idle kept association: reactor and DUL look at the peer every ``poll`` s, not every 1 ms,
    and pynetdicom's network idle timeout is off (the owner releases idle associations itself)."""
    gate = _gate(assoc)
    if not isinstance(assoc._dul_ready, _DulPacer) and assoc._dul_ready.is_set():
        assoc._dul_ready = _DulPacer(gate)
    if not gate.pace:  # not idle already
        gate.network_timeout = assoc.network_timeout
        assoc.network_timeout = None
    gate.set_pace(poll)


def reactor_awake(assoc: Association) -> None:
    """Back to pynetdicom's pace, at once, before the association is used again (or released);
    the network idle timeout applies again, counted from now."""
    gate = assoc._reactor_checkpoint
    if isinstance(gate, _Gate) and gate.pace:
        assoc.dul._idle_timer.restart()
        assoc.network_timeout = gate.network_timeout
        gate.set_pace(0.0)
