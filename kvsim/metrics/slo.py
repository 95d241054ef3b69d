"""Service-level objectives: one grammar for every command.

An SLO is a list of terms ``metric[:stat]=limit`` (``ttft_ms:p99=2000,tpot_ms=100``): metrics ``ttft_ms``,
``tpot_ms``, ``itl_ms``, ``e2el_ms``; stats ``mean``, ``p50`` (= ``median``), ``p90``, ``p99`` (the default),
``max``. Each term is read two ways:

- per request (:func:`goodput_slo`): a request is *good* when its own TTFT, TPOT and E2EL are within every
  term's limit (the tightest per metric); ``goodput`` in summary.json counts good requests per second, as
  vLLM's ``--goodput``. ITL has no per-request value, so a replay refuses an ``itl_ms`` term
  (:func:`parse_goodput_slo`);
- over the run (:func:`check_slo`): the term's stat of the metric is within the limit. ``kvsim plan`` and
  ``kvsim sweep`` call a configuration feasible when every term is met and nothing was rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.errors import ConfigError

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
#: the metrics a single request has a value of (goodput's per-request limits)
REQUEST_METRICS = ("ttft_ms", "tpot_ms", "e2el_ms")
#: SLO stat name -> key in a summary's latency dict
STATS = {"mean": "mean", "p50": "median", "median": "median", "p90": "p90", "p99": "p99", "max": "max"}
DEFAULT_STAT = "p99"


@dataclass
class SLO:
    """Per-request limits: a request meets the SLO when each of its metrics is within its limit."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self):
        for k in REQUEST_METRICS:
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0)):
                raise ConfigError(f"SLO {k}={v!r}: a limit must be a finite number of milliseconds > 0")

    def met(self, ttft_ms: float, tpot_ms: float, e2el_ms: float) -> bool:
        return ((self.ttft_ms is None or ttft_ms <= self.ttft_ms)
                and (self.tpot_ms is None or tpot_ms <= self.tpot_ms)
                and (self.e2el_ms is None or e2el_ms <= self.e2el_ms))

    def as_dict(self) -> dict:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms), ("e2el_ms", self.e2el_ms)) if v is not None}


@dataclass(frozen=True)
class SLOTerm:
    metric: str
    stat: str
    limit: float

    @property
    def key(self) -> str:
        """Column name of this term's value, e.g. ``ttft_ms_p99``."""
        return f"{self.metric}_{'p50' if self.stat == 'median' else self.stat}"

    def value(self, summary: dict) -> float | None:
        d = summary.get(self.metric) or {}
        return d.get(STATS[self.stat])

    def __str__(self) -> str:
        return f"{self.metric}:{self.stat}={self.limit:g}"


def parse_slo_terms(slo) -> tuple[SLOTerm, ...]:
    """``"ttft_ms:p99=2000,tpot_ms:p99=100"``, a mapping ``{"ttft_ms:p99": 2000}``, or a list of
    SLOTerm / strings. A term without a stat (``ttft_ms=2000``) means p99."""
    if slo is None or slo == "":
        return ()
    if isinstance(slo, SLOTerm):
        return (slo,)
    if isinstance(slo, dict):
        parts = [f"{k}={v}" for k, v in slo.items()]
    elif isinstance(slo, str):
        parts = [p for p in (x.strip() for x in slo.split(",")) if p]
    else:
        terms: list[SLOTerm] = []
        for x in slo:
            terms.extend(parse_slo_terms(x))
        return tuple(terms)
    terms = []
    for part in parts:
        lhs, eq, rhs = part.partition("=")
        metric, _, stat = lhs.strip().partition(":")
        metric, stat = metric.strip(), (stat.strip() or DEFAULT_STAT)
        if not eq or metric not in METRICS:
            raise ConfigError(f"SLO {slo!r}: {part!r} is not metric:stat=value with metric one of {', '.join(METRICS)}")
        if stat not in STATS:
            raise ConfigError(f"SLO {slo!r}: {part!r}: stat {stat!r} is not one of {', '.join(STATS)}")
        try:
            limit = float(rhs)
        except ValueError:
            raise ConfigError(f"SLO {slo!r}: {part!r}: limit {rhs.strip()!r} is not a number") from None
        if not (math.isfinite(limit) and limit > 0):
            raise ConfigError(f"SLO {slo!r}: {part!r}: limit must be a finite number > 0")
        terms.append(SLOTerm(metric, stat, limit))
    return tuple(terms)


def goodput_slo(terms) -> SLO:
    """Per-request thresholds for the summary's ``goodput`` (the tightest limit per metric)."""
    vals: dict[str, float] = {}
    for t in terms:
        if t.metric in REQUEST_METRICS:
            vals[t.metric] = min(vals.get(t.metric, math.inf), t.limit)
    return SLO(**vals)


def parse_goodput_slo(slo) -> SLO:
    """An SLO given to a replay (``--slo``): its per-request limits. A term on a metric no single request
    has (``itl_ms``) is refused rather than ignored."""
    if isinstance(slo, SLO):
        return slo
    terms = parse_slo_terms(slo)
    for t in terms:
        if t.metric not in REQUEST_METRICS:
            raise ConfigError(f"SLO {slo!r}: term {t}: a replay counts goodput per request, and a request has no "
                              f"single {t.metric}; use {', '.join(REQUEST_METRICS)} (kvsim plan checks {t.metric} "
                              "percentiles)")
    return goodput_slo(terms)


def check_slo(summary: dict, terms) -> dict:
    """Does this replay meet the SLO? ``{"feasible", "margin_pct", "worst_term", "values", "reason"}``.

    ``margin_pct`` = min over terms of (limit - value) / limit x 100: positive is headroom below the
    tightest term, negative is how far over it the run is. Rejected requests make the run infeasible.
    A term whose metric has no samples (e.g. TPOT when every output is one token) is met.
    """
    values, margin, worst = {}, math.inf, None
    for t in terms:
        v = t.value(summary)
        values[t.key] = v
        m = 100.0 * (t.limit - v) / t.limit if v is not None else 100.0
        if m < margin:
            margin, worst = m, str(t)
    rejected = summary.get("rejected", 0) or 0
    completed = summary.get("completed", 0) or 0
    reasons = []
    if rejected:
        reasons.append(f"{rejected} rejected")
    if completed == 0:
        reasons.append("no request completed")
    if terms and margin < 0:
        reasons.append(f"{worst} missed by {-margin:.1f}%")
    return {"feasible": not reasons, "margin_pct": None if margin == math.inf else margin, "worst_term": worst,
            "values": values, "reason": "; ".join(reasons)}


__all__ = ["METRICS", "REQUEST_METRICS", "SLO", "SLOTerm", "STATS", "check_slo", "goodput_slo", "parse_goodput_slo",
           "parse_slo_terms"]
