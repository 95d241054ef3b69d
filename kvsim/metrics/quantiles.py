"""Percentiles in bounded memory.

Exact (numpy's default linear interpolation, as vLLM's benchmark reports them) while there are at most
``exact_limit`` entries; past that the values move into a log-spaced histogram with bins ``rel_width``
wide (1e-4 = 0.01 %), so memory stays bounded however long the trace is. Weights are integer
multiplicities (a decode step gives every sequence in the batch the same inter-token latency).
Values are buffered and folded in with numpy, since ``add`` sits on the simulator's hot path.

A percentile means the same thing everywhere in kvsim and kvprof: numpy's linear interpolation between order
statistics (``np.percentile``, as vLLM's benchmark reports them); this accumulator gives exactly that while
it is exact, and the histogram's bin centre within ``rel_width`` after.
"""

from __future__ import annotations

import math

import numpy as np

_FLUSH = 1 << 16


class Quantiles:
    __slots__ = ("_bv", "_bw", "_v", "_w", "_hist", "_limit", "_rel", "_count", "_total", "_min", "_max", "_m2")

    def __init__(self, exact_limit: int = 200_000, rel_width: float = 1e-4):
        self._bv: list[float] = []
        self._bw: list[int] = []
        self._v = np.empty(0)
        self._w = np.empty(0, dtype=np.int64)
        self._hist: dict[int, int] | None = None
        self._limit = exact_limit
        self._rel = math.log1p(rel_width)
        self._count = 0
        self._total = 0.0
        self._min = math.inf
        self._max = -math.inf
        #: sum of squared deviations from the mean (for the standard deviation, merged batch by batch)
        self._m2 = 0.0

    def add(self, value: float, weight: int = 1) -> None:
        self._bv.append(value)
        self._bw.append(weight)
        if len(self._bv) >= _FLUSH:
            self._flush()

    def add_many(self, values, weight: int = 1) -> None:
        self._bv.extend(values)
        self._bw.extend([weight] * len(values))
        if len(self._bv) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self._bv:
            return
        v = np.asarray(self._bv, dtype=float)
        w = np.asarray(self._bw, dtype=np.int64)
        self._bv, self._bw = [], []
        n_b = int(w.sum())
        # numpy's own (pairwise) sum, not np.dot: BLAS splits a long dot product over threads, so the
        # last bits depend on the machine's thread count, and its idle workers spin on a CPU core
        t_b = float((v * w).sum())
        mean_b = t_b / n_b
        m2_b = float((w * (v - mean_b) ** 2).sum())
        n_a = self._count
        if n_a:
            # Chan et al.'s pairwise update: no cancellation from a running sum of squares
            d = mean_b - self._total / n_a
            self._m2 += m2_b + d * d * n_a * n_b / (n_a + n_b)
        else:
            self._m2 = m2_b
        self._count = n_a + n_b
        self._total += t_b
        self._min = min(self._min, float(v.min()))
        self._max = max(self._max, float(v.max()))
        if self._hist is None:
            self._v = np.concatenate([self._v, v])
            self._w = np.concatenate([self._w, w])
            if len(self._v) > self._limit:
                self._hist = {}
                v, w = self._v, self._w
                self._v, self._w = np.empty(0), np.empty(0, dtype=np.int64)
                self._bin(v, w)
        else:
            self._bin(v, w)

    def _bin(self, v: np.ndarray, w: np.ndarray) -> None:
        keys = np.where(v > 0, np.floor(np.log(np.maximum(v, 1e-300)) / self._rel), -(10**9)).astype(np.int64)
        uk, inv = np.unique(keys, return_inverse=True)
        sums = np.bincount(inv, weights=w)
        h = self._hist
        for k, c in zip(uk.tolist(), sums.tolist()):
            h[k] = h.get(k, 0) + int(c)

    @property
    def exact(self) -> bool:
        self._flush()
        return self._hist is None

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    def percentile(self, q: float) -> float:
        """q in [0, 100]; linear interpolation between order statistics (numpy's default)."""
        self._flush()
        if self._count == 0:
            return float("nan")
        if self._hist is None:
            order = np.argsort(self._v, kind="stable")
            vs, cw = self._v[order], np.cumsum(self._w[order])
        else:
            keys = sorted(self._hist)
            vs = np.array([math.exp((k + 0.5) * self._rel) if k > -(10**9) else 0.0 for k in keys])
            cw = np.cumsum([self._hist[k] for k in keys])
        pos = (self._count - 1) * q / 100.0
        lo = math.floor(pos)
        frac = pos - lo
        i_lo = int(np.searchsorted(cw, lo + 1))
        i_hi = int(np.searchsorted(cw, min(lo + 2, self._count)))
        return float(vs[i_lo] + (vs[i_hi] - vs[i_lo]) * frac)

    def summary(self, scale: float = 1.0) -> dict:
        self._flush()
        if self._count == 0:
            return {"mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None, "std": None,
                    "count": 0}
        return {
            "mean": self._total / self._count * scale,
            # population standard deviation (numpy's np.std, as vLLM's benchmark reports std_*_ms)
            "std": math.sqrt(max(0.0, self._m2 / self._count)) * scale,
            "median": self.percentile(50) * scale,
            "p90": self.percentile(90) * scale,
            "p99": self.percentile(99) * scale,
            "min": self._min * scale,
            "max": self._max * scale,
            "count": self._count,
        }
