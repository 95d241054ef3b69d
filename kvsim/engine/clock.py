"""The one place kvsim touches SimPy's internals (``Environment._queue``, ``_eid``, ``_now``; an event's
``_ok`` and ``_value``; a process's ``_target`` and ``_resume``). They are not SimPy's public API, so
pyproject.toml pins simpy to the range tests/test_clock.py runs against; everything else in kvsim uses
SimPy's public API only (``process``, ``run``, ``step``, ``now``, ``Event.succeed``).

Why: SimPy schedules at ``now + delay``, and no delay may land exactly on a given time ``t`` (when ``now``
has finer bits than ``t``, ``now + d`` can skip ``t``'s value for every d). kvsim places events at their
absolute time instead, so a step ends exactly at the time the replica computed, whether it was stepped
or fast-forwarded, and clocks never drift between runs.
"""

from __future__ import annotations

from heapq import heappush

import simpy
from simpy.core import EmptySchedule
from simpy.events import NORMAL, URGENT, Event

#: the SimPy releases whose internals :class:`Clock` relies on (pyproject.toml pins the same range)
SIMPY_TESTED = ((4, 1), (4, 2))


class Clock(simpy.Environment):
    """A SimPy environment that schedules events at absolute times."""

    def at(self, t: float, priority: int = URGENT) -> Event:
        """A triggered event at the absolute time ``t`` (now if ``t`` is past), made and queued in one go
        (what ``Timeout`` does for ``now + delay``, without its arithmetic and checks)."""
        ev = Event.__new__(Event)
        ev.env = self
        ev.callbacks = []
        ev._ok = True
        ev._value = None
        heappush(self._queue, (t if t > self._now else self._now, priority, next(self._eid), ev))
        return ev

    def wait_instead(self, proc: simpy.Process, t: float, priority: int) -> None:
        """``proc`` waits for an event at ``t`` instead of the one it waits for now. What interrupting it
        and having it yield a new event would do, without throwing an exception into it (a stretch is
        cut short on almost every arrival); the old event stays queued, with nobody waiting on it."""
        proc._target.callbacks.remove(proc._resume)
        ev = self.at(t, priority)
        ev.callbacks.append(proc._resume)
        proc._target = ev


__all__ = ["Clock", "EmptySchedule", "Event", "NORMAL", "SIMPY_TESTED", "URGENT"]
