"""Replicas behind a router. The load a router sees (``outstanding_tokens``: prompt + output tokens of
the requests a replica holds) changes only at assignment and completion, never mid-step, so decisions
do not depend on whether decode stretches were fast-forwarded."""

from __future__ import annotations

from kvsim.engine.replica import Replica


class RoundRobinRouter:
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def pick(self, replicas: list[Replica]) -> Replica:
        r = replicas[self._next % len(replicas)]
        self._next += 1
        return r


class LeastOutstandingTokensRouter:
    name = "least-outstanding-tokens"

    def pick(self, replicas: list[Replica]) -> Replica:
        # ties go to the lowest replica id, so runs are deterministic (a loop: this runs per arrival)
        best = replicas[0]
        least = best.outstanding_tokens
        for r in replicas[1:]:
            o = r.outstanding_tokens
            if o < least or (o == least and r.id < best.id):
                best, least = r, o
        return best


def make_router(name: str):
    return {"round-robin": RoundRobinRouter, "least-outstanding-tokens": LeastOutstandingTokensRouter}[name]()
