"""A progress bar is one more observer of a run (kvsim.engine.events): it counts what it is told."""

from __future__ import annotations

import sys

from kvsim.engine.events import Observer


def make_bar(total: int | None, desc: str, unit: str = "req"):
    """A tqdm bar on stderr, off when stderr is not a terminal (tqdm's ``disable=None``)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, mininterval=0.5, disable=None)


class ArrivalProgress(Observer):
    """Advances ``bar`` by the requests that arrived (every ``every`` of them, then the rest at the end)."""

    def __init__(self, bar, every: int = 1024):
        self.bar = bar
        self.every = every
        self._n = 0

    def on_arrival(self, arrival_time_s) -> None:
        self._n += 1
        if self._n % self.every == 0:
            self.bar.update(self.every)

    def on_end(self, now_s: float) -> None:
        self.bar.update(self._n % self.every)


class DoneProgress(Observer):
    """Advances ``bar`` by the requests that are done: finished or rejected (a real-time engine's bar)."""

    def __init__(self, bar):
        self.bar = bar

    def on_reject(self, request_id, arrival_time_s, prompt_tokens, output_tokens, reason, replica=-1) -> None:
        self.bar.update(1)

    def on_step(self, step) -> None:
        if step.finished:
            self.bar.update(len(step.finished))


__all__ = ["ArrivalProgress", "DoneProgress", "make_bar"]
