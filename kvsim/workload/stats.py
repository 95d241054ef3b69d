"""Summary statistics of a request stream, in one streaming pass.

Per request only three numbers are kept (arrival as a C double, prompt and output lengths as C
ints in :class:`array.array`), about 16 bytes a request, so exact percentiles of a few million
requests fit in well under 100 MB.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Iterable

import numpy as np

from kvsim.workload.request import InvalidRecord, Request

__all__ = ["trace_stats", "format_stats"]

_PCTS = (50, 90, 99)


def _append(arr: array, v: int) -> array:
    """Append *v*, widening a 32-bit array to 64 bits the first time a value does not fit."""
    try:
        arr.append(v)
    except OverflowError:
        arr = array("q", arr)
        arr.append(v)
    return arr


def _dist(values: array) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    a = np.frombuffer(values, dtype=np.int32 if values.typecode == "i" else np.int64)
    p50, p90, p99 = np.percentile(a, _PCTS)
    return {
        "mean": float(a.mean(dtype=np.float64)),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": int(a.min()),
        "max": int(a.max()),
    }


def trace_stats(requests: Iterable[Request | InvalidRecord], *, prefix_reuse: bool = False) -> dict:
    """Statistics of *requests* (e.g. ``read_trace(path, skip_invalid=True)``), consumed once.

    Keys:

    * ``count``: valid requests; ``rejected``: ``{code: n}`` of :class:`InvalidRecord` items, and
      ``rejected_total``;
    * ``first_arrival_s``, ``last_arrival_s``, ``duration_s`` (last - first);
    * ``request_rate_per_s``: ``(count - 1) / duration_s`` (1 / mean inter-arrival gap; None when
      the duration is 0); ``interarrival_cv``: standard deviation / mean of the gaps (1 for Poisson);
    * ``prompt_tokens`` and ``output_tokens``: dicts of mean, p50, p90, p99 (linear interpolation),
      min, max; ``total_prompt_tokens``, ``total_output_tokens``, ``total_tokens``;
      ``prompt_tokens_per_s`` and ``output_tokens_per_s`` (totals / duration);
    * ``prefix_hash_share``: fraction of requests that carry prefix hashes;
    * with *prefix_reuse*: ``prefix_block_reuse``, the fraction of hashed blocks whose hash
      appeared in an earlier request (the hit ratio of an infinite prefix cache). This keeps a set
      of all distinct hashes, so memory grows with their number; off by default.
    """
    times = array("d")
    prompts = array("i")
    outputs = array("i")
    rejected: Counter = Counter()
    with_hashes = 0
    seen: set[int] = set()
    blocks = hits = 0
    for r in requests:
        if isinstance(r, InvalidRecord):
            rejected[r.code] += 1
            continue
        times.append(r.arrival_time_s)
        prompts = _append(prompts, r.prompt_tokens)
        outputs = _append(outputs, r.output_tokens)
        h = r.prefix_hashes
        if h:
            with_hashes += 1
            if prefix_reuse:
                blocks += len(h)
                for x in h:
                    if x in seen:
                        hits += 1
                    else:
                        seen.add(x)
    n = len(times)
    t = np.frombuffer(times, dtype=np.float64) if n else np.empty(0)
    first = float(t[0]) if n else None
    last = float(t[-1]) if n else None
    duration = (last - first) if n else 0.0
    cv = None
    if n >= 3:
        gaps = np.diff(t)
        mean_gap = float(gaps.mean())
        if mean_gap > 0:
            cv = float(gaps.std()) / mean_gap
    total_p = int(np.frombuffer(prompts, dtype=np.int32 if prompts.typecode == "i" else np.int64).sum(dtype=np.int64)) if n else 0
    total_o = int(np.frombuffer(outputs, dtype=np.int32 if outputs.typecode == "i" else np.int64).sum(dtype=np.int64)) if n else 0
    out = {
        "count": n,
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        "first_arrival_s": first,
        "last_arrival_s": last,
        "duration_s": duration,
        "request_rate_per_s": (n - 1) / duration if duration > 0 else None,
        "interarrival_cv": cv,
        "prompt_tokens": _dist(prompts),
        "output_tokens": _dist(outputs),
        "total_prompt_tokens": total_p,
        "total_output_tokens": total_o,
        "total_tokens": total_p + total_o,
        "prompt_tokens_per_s": total_p / duration if duration > 0 else None,
        "output_tokens_per_s": total_o / duration if duration > 0 else None,
        "prefix_hash_share": with_hashes / n if n else 0.0,
    }
    if prefix_reuse:
        out["prefix_block_reuse"] = hits / blocks if blocks else None
    return out


def _num(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def format_stats(d: dict, title: str | None = None) -> str:
    """A one-screen, human-readable rendering of :func:`trace_stats`'s dict."""
    lines = []
    if title:
        lines.append(title)
    rej = ""
    if d.get("rejected_total"):
        rej = f"   rejected {d['rejected_total']:,} (" + ", ".join(f"{k} {v:,}" for k, v in d["rejected"].items()) + ")"
    lines.append(f"requests        {d['count']:,}{rej}")
    lines.append(
        f"duration        {_num(d['duration_s'], 1)} s   rate {_num(d['request_rate_per_s'], 3)} req/s   "
        f"inter-arrival CV {_num(d['interarrival_cv'], 2)}"
    )
    lines.append(f"{'tokens':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'min':>10}{'max':>10}")
    for key, label in (("prompt_tokens", "  prompt"), ("output_tokens", "  output")):
        s = d[key]
        lines.append(f"{label:<12}" + "".join(f"{_num(s[k]):>10}" for k in ("mean", "p50", "p90", "p99", "min", "max")))
    lines.append(
        f"total tokens    {d['total_tokens']:,} (prompt {d['total_prompt_tokens']:,}, output {d['total_output_tokens']:,})"
    )
    if d.get("prompt_tokens_per_s") is not None:
        lines.append(
            f"token rate      prompt {_num(d['prompt_tokens_per_s'])}/s   output {_num(d['output_tokens_per_s'])}/s"
        )
    share = f"prefix hashes   {100 * d['prefix_hash_share']:.1f}% of requests"
    if d.get("prefix_block_reuse") is not None:
        share += f"   block reuse (infinite cache) {100 * d['prefix_block_reuse']:.1f}%"
    lines.append(share)
    return "\n".join(lines)
