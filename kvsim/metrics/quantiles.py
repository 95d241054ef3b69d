"""Percentiles in bounded memory.

Exact (numpy's default linear interpolation, as vLLM's benchmark reports them) while there are at most
``exact_limit`` distinct entries; past that the values move into a log-spaced histogram with bins
``rel_width`` wide (1e-4 = 0.01 %), so memory stays bounded however long the trace is. Weights are
integer multiplicities (a decode step gives every sequence in the batch the same inter-token latency).
"""

from __future__ import annotations

import math
from array import array

import numpy as np


class Quantiles:
    __slots__ = ("_v", "_w", "_hist", "_limit", "_rel", "count", "total", "min", "max")

    def __init__(self, exact_limit: int = 200_000, rel_width: float = 1e-4):
        self._v = array("d")
        self._w = array("q")
        self._hist: dict[int, int] | None = None
        self._limit = exact_limit
        self._rel = math.log1p(rel_width)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def exact(self) -> bool:
        return self._hist is None

    def add(self, value: float, weight: int = 1) -> None:
        self.count += weight
        self.total += value * weight
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if self._hist is None:
            self._v.append(value)
            self._w.append(weight)
            if len(self._v) > self._limit:
                self._spill()
        else:
            self._bin(value, weight)

    def add_many(self, values, weight: int = 1) -> None:
        for v in values:
            self.add(v, weight)

    def _bin(self, value: float, weight: int) -> None:
        k = math.floor(math.log(value) / self._rel) if value > 0 else -(10**9)
        h = self._hist
        h[k] = h.get(k, 0) + weight

    def _spill(self) -> None:
        self._hist = {}
        for v, w in zip(self._v, self._w):
            self._bin(v, w)
        self._v = array("d")
        self._w = array("q")

    def percentile(self, q: float) -> float:
        """q in [0, 100]; linear interpolation between order statistics (numpy's default)."""
        if self.count == 0:
            return float("nan")
        if self._hist is None:
            v = np.frombuffer(self._v, dtype=float) if len(self._v) else np.empty(0)
            w = np.frombuffer(self._w, dtype=np.int64)
            order = np.argsort(v, kind="stable")
            vs, cw = v[order], np.cumsum(w[order])
        else:
            keys = sorted(self._hist)
            vs = np.array([math.exp((k + 0.5) * self._rel) if k > -(10**9) else 0.0 for k in keys])
            cw = np.cumsum([self._hist[k] for k in keys])
        pos = (self.count - 1) * q / 100.0
        lo = math.floor(pos)
        frac = pos - lo
        i_lo = int(np.searchsorted(cw, lo + 1))
        i_hi = int(np.searchsorted(cw, min(lo + 2, self.count)))
        return float(vs[i_lo] + (vs[i_hi] - vs[i_lo]) * frac)

    def summary(self, scale: float = 1.0) -> dict:
        if self.count == 0:
            return {"mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None, "count": 0}
        return {
            "mean": self.total / self.count * scale,
            "median": self.percentile(50) * scale,
            "p90": self.percentile(90) * scale,
            "p99": self.percentile(99) * scale,
            "min": self.min * scale,
            "max": self.max * scale,
            "count": self.count,
        }
