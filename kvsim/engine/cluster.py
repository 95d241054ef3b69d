"""Replicas behind a router. The load a router sees (``outstanding_tokens``: prompt + output tokens of
the requests a replica holds) changes only at assignment and completion, never mid-step, so decisions
do not depend on whether decode stretches were fast-forwarded.

:class:`VllmDPBalancer` is vLLM's own balancing across the data-parallel ranks of one engine: it picks
the rank inside a lockstep group (``kvsim.engine.sim``) and is offered as the router ``vllm-dp``. The
(waiting, running) counts it reads change at step starts (admission) too, but a fast-forwarded stretch
admits nobody and completes requests only at its end, as stepping would, so its decisions do not depend
on fast-forwarding either.
"""

from __future__ import annotations

import math

from kvsim.engine.replica import Replica


class RoundRobinRouter:
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def pick(self, replicas: list[Replica], now: float = 0.0) -> Replica:
        r = replicas[self._next % len(replicas)]
        self._next += 1
        return r


class LeastOutstandingTokensRouter:
    name = "least-outstanding-tokens"

    def pick(self, replicas: list[Replica], now: float = 0.0) -> Replica:
        # ties go to the lowest replica id, so runs are deterministic
        return min(replicas, key=lambda r: (r.outstanding_tokens, r.id))


def request_counts(unit) -> tuple[int, int]:
    """(waiting, running) of a replica, or summed over a lockstep group's ranks. Waiting includes
    preempted requests, as vLLM's ``Scheduler.get_request_counts`` does."""
    ranks = getattr(unit, "ranks", None) or (unit,)
    waiting = running = 0
    for r in ranks:
        waiting += len(r.scheduler.waiting)
        running += len(r.scheduler.running)
    return waiting, running


class VllmDPBalancer:
    """vLLM's internal data-parallel load balancing, as of v0.19.0 (read in the v0.19.0 wheel:
    ``vllm/v1/engine/core_client.py`` ``DPLBAsyncMPClient.get_core_engine_for_request``,
    ``vllm/v1/engine/coordinator.py``, ``vllm/v1/engine/core.py`` ``DPEngineCoreProc``).

    A request goes to the rank with the lowest ``4 * waiting + running`` (ties: the lowest rank, the scan
    starting at ``eng_start_index`` = 0 for a single front end), as the front end *sees* the counts: each
    rank publishes its counts after every step, the DP coordinator forwards them to the front end at most
    every ``min_stats_update_interval_ms`` = 100 ms, and between two snapshots the front end adds one
    waiting request to the rank it just chose (``current_counts[eng_index][0] += client_count``), so a
    burst does not pile onto one rank. kvsim takes the snapshot at the first arrival at least
    ``stats_interval_s`` after the previous one, from the ranks' current counts; vLLM's is up to one
    interval plus one step older. ``stats_interval_s = 0`` reads the current counts at every arrival.

    vLLM 0.19 publishes counts only for MoE models (``DPEngineCoreProc``); dense DP ranks are independent
    engines and its front end then sees its own increments only, i.e. round-robin.
    """

    name = "vllm-dp"
    #: ``score = waiting * 4 + running``
    WAITING_WEIGHT = 4

    def __init__(self, stats_interval_s: float = 0.1):
        if not (stats_interval_s >= 0 and math.isfinite(stats_interval_s)):
            raise ValueError(f"stats_interval_s = {stats_interval_s!r}: must be a finite number >= 0")
        self.stats_interval_s = stats_interval_s
        self._seen: list[list[int]] | None = None
        self._snapshot_s = -math.inf

    def pick(self, units: list, now: float = 0.0):
        seen = self._seen
        if seen is None or len(seen) != len(units) or now >= self._snapshot_s + self.stats_interval_s:
            seen = self._seen = [list(request_counts(u)) for u in units]
            self._snapshot_s = now
        w = self.WAITING_WEIGHT
        best = 0
        best_score = w * seen[0][0] + seen[0][1]
        for i in range(1, len(units)):
            score = w * seen[i][0] + seen[i][1]
            if score < best_score:
                best, best_score = i, score
        seen[best][0] += 1
        return units[best]


ROUTERS = {"round-robin": RoundRobinRouter, "least-outstanding-tokens": LeastOutstandingTokensRouter,
           "vllm-dp": VllmDPBalancer}


def make_router(name: str):
    return ROUTERS[name]()
