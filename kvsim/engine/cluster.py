"""Replicas behind a router. The load a router sees (``outstanding_tokens``: prompt + output tokens of
the requests a replica holds) changes only at assignment and completion, never mid-step, so decisions
do not depend on whether decode stretches were fast-forwarded.

:class:`VllmDPBalancer` is vLLM's own balancing across the data-parallel ranks of one engine: it picks
the rank inside a lockstep group (``kvsim.engine.sim``) and is offered as the router ``vllm-dp``. The
(waiting, running) counts it reads change at step starts (admission) too, but a fast-forwarded stretch
admits nobody and completes requests only at its end, as stepping would, so its decisions do not depend
on fast-forwarding either.

:func:`cudagraph_capture_sizes` and :func:`dp_token_counts` are how vLLM 0.19 sizes the forward of each
data-parallel rank of a lockstep group (used by ``kvsim.engine.sim``, ``Simulation._group``).
"""

from __future__ import annotations

import math
from bisect import bisect_left

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
        # ties go to the lowest replica id, so runs are deterministic (a loop: this runs per arrival)
        best = replicas[0]
        least = best.outstanding_tokens
        for r in replicas[1:]:
            o = r.outstanding_tokens
            if o < least or (o == least and r.id < best.id):
                best, least = r, o
        return best


def request_counts(unit) -> tuple[int, int]:
    """(waiting, running) of a replica, or summed over a lockstep group's ranks. Waiting includes
    preempted requests, as vLLM's ``Scheduler.get_request_counts`` does."""
    ranks = getattr(unit, "ranks", None) or (unit,)
    waiting = running = 0
    for r in ranks:
        waiting += len(r.scheduler.waiting)
        running += len(r.scheduler.running)
    return waiting, running


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM 0.19's default CUDA-graph capture sizes (``vllm/config/vllm.py``,
    ``VllmConfig._set_cudagraph_sizes``, CUDA graphs on, no speculative decoding, performance mode
    "balanced"): the largest is ``min(2 max_num_seqs, 512, max_num_batched_tokens)``; the sizes are
    1, 2, 4, then multiples of 8 below 256, then multiples of 16 from 256, up to that largest.
    E.g. max_num_seqs 128, max_num_batched_tokens 2048: 1, 2, 4, 8, 16, ..., 248, 256."""
    top = min(2 * max_num_seqs, 512, max_num_batched_tokens)
    sizes = [i for i in (1, 2, 4) if i <= top]
    if top >= 8:
        sizes += list(range(8, min(top + 1, 256), 8))
    if top >= 256:
        sizes += list(range(256, top + 1, 16))
    return sorted(set(sizes))


def dp_token_counts(tokens: list[int], capture_sizes: list[int]) -> list[int]:
    """The token count each data-parallel rank's forward runs with in one lockstep step, as vLLM 0.19
    decides it (``vllm/v1/worker/gpu_model_runner.py`` ``_determine_batch_execution_and_padding``,
    ``vllm/v1/worker/dp_utils.py`` ``coordinate_batch_across_dp``). ``tokens``: each rank's scheduled
    tokens, an idle rank counted as its dummy batch of 1 token (``gpu_worker.py``
    ``execute_dummy_batch`` -> ``_dummy_run(1, uniform_decode=True)``).

    - Each rank first pads its count to the smallest capture size >= it when a CUDA graph covers it
      (``CudagraphDispatcher.dispatch``: none above ``max_cudagraph_capture_size``; every capture size
      has a piecewise graph, so a mixed prefill + decode batch qualifies too), else runs eager unpadded.
    - The ranks all-reduce (count, padded count, cudagraph mode); the synced mode is the minimum over
      ranks, and only when it is not NONE (every rank runs a graph) is every rank padded to the largest
      padded count (``_post_process_dp_padding``). Otherwise each rank keeps its own (padded) count and
      the whole step runs eager.
    """
    if not capture_sizes:
        return list(tokens)
    top = capture_sizes[-1]
    padded = [capture_sizes[bisect_left(capture_sizes, t)] if 0 < t <= top else t for t in tokens]
    if all(0 < t <= top for t in tokens):
        return [max(padded)] * len(tokens)
    return padded


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
