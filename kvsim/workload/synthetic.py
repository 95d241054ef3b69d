"""Synthetic workloads: Poisson / gamma / constant arrivals with sampled (prompt, output) lengths.

:func:`synthetic_requests` is a generator: it draws random numbers in numpy chunks of
:data:`CHUNK` requests and yields :class:`Request` objects one by one, so memory is constant however
many requests are asked for. The stream depends only on the seed and the parameters: arrivals and
lengths use two independent random streams spawned from ``seed``, so changing the length sampler
does not move the arrival times, and the first *n* requests do not depend on ``num_requests``.

Length samplers (anything with ``sample(rng, n) -> (prompt_array, output_array)``):

* :class:`FixedLengths` -- every request the same;
* :class:`UniformLengths` -- independent uniform integers in inclusive ranges;
* :class:`LengthStats` -- (prompt, output) *pairs* drawn jointly, with replacement, from a table,
  e.g. the Vidur / Sarathi-Serve ``*_stats_*.csv`` files (``num_prefill_tokens,num_decode_tokens``)
  or the lengths of any trace (:meth:`LengthStats.from_requests`);
* :class:`QuantileLengths` -- independent piecewise-linear quantile functions for prompt and output
  (a compact, file-free approximation of an empirical distribution; see ``traces/make_sample.py``).
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from kvsim.errors import ConfigError, TraceError
from kvsim.workload.request import InvalidRecord, Request

__all__ = [
    "ARRIVALS",
    "CHUNK",
    "FixedLengths",
    "RequestLengths",
    "LengthStats",
    "QuantileLengths",
    "UniformLengths",
    "head",
    "rescale_arrivals",
    "synthetic_requests",
]

#: requests drawn per numpy call; part of the definition of the random stream (do not change lightly)
CHUNK = 65536
#: arrival processes known to :func:`synthetic_requests`
ARRIVALS = ("poisson", "gamma", "constant")


class RequestLengths(Protocol):
    """Where a synthetic trace's prompt and output lengths come from (not to be confused with
    kvsim.engine.output_length.LengthSampler, which scales a trace's output lengths under compression)."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return *n* prompt lengths and *n* output lengths (positive integer arrays)."""


def _pos_int(name: str, v) -> int:
    if type(v) is not int or v <= 0:  # bool is rejected too
        if isinstance(v, np.integer) and v > 0:
            return int(v)
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


def _opt_pos_int(name: str, v) -> int | None:
    return None if v is None else _pos_int(name, v)


class FixedLengths:
    """Every request has *prompt* prompt tokens and *output* output tokens."""

    def __init__(self, prompt: int, output: int):
        self.prompt = _pos_int("prompt", prompt)
        self.output = _pos_int("output", output)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt, dtype=np.int64), np.full(n, self.output, dtype=np.int64)

    def __repr__(self) -> str:
        return f"FixedLengths(prompt={self.prompt}, output={self.output})"


class UniformLengths:
    """Prompt uniform in [prompt_min, prompt_max] and output uniform in [output_min, output_max] (inclusive, independent)."""

    def __init__(self, prompt_min: int, prompt_max: int, output_min: int, output_max: int):
        self.prompt_min = _pos_int("prompt_min", prompt_min)
        self.prompt_max = _pos_int("prompt_max", prompt_max)
        self.output_min = _pos_int("output_min", output_min)
        self.output_max = _pos_int("output_max", output_max)
        if self.prompt_min > self.prompt_max:
            raise ConfigError(f"prompt_min {prompt_min} > prompt_max {prompt_max}")
        if self.output_min > self.output_max:
            raise ConfigError(f"output_min {output_min} > output_max {output_max}")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.integers(self.prompt_min, self.prompt_max, size=n, endpoint=True, dtype=np.int64)
        o = rng.integers(self.output_min, self.output_max, size=n, endpoint=True, dtype=np.int64)
        return p, o

    def __repr__(self) -> str:
        return (
            f"UniformLengths(prompt_min={self.prompt_min}, prompt_max={self.prompt_max}, "
            f"output_min={self.output_min}, output_max={self.output_max})"
        )


class LengthStats:
    """An empirical table of (prompt, output) pairs; :meth:`sample` draws rows uniformly with replacement.

    Pairs are drawn jointly, so any correlation between prompt and output length is kept.
    """

    def __init__(self, prompt_tokens: Sequence[int] | np.ndarray, output_tokens: Sequence[int] | np.ndarray, *, name: str = ""):
        p = np.asarray(prompt_tokens, dtype=np.int64).ravel()
        o = np.asarray(output_tokens, dtype=np.int64).ravel()
        if p.shape != o.shape:
            raise ConfigError(f"LengthStats{name and ' ' + name}: {p.size} prompt lengths but {o.size} output lengths")
        if p.size == 0:
            raise ConfigError(f"LengthStats{name and ' ' + name}: no (prompt, output) pairs")
        if p.min() <= 0 or o.min() <= 0:
            raise ConfigError(f"LengthStats{name and ' ' + name}: lengths must be positive")
        self.prompt_tokens = p
        self.output_tokens = o
        self.name = name

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)

    def __repr__(self) -> str:
        return f"LengthStats({self.name or 'table'}: {len(self)} pairs)"

    @classmethod
    def from_csv(
        cls,
        path,
        *,
        prompt_column: str = "num_prefill_tokens",
        output_column: str = "num_decode_tokens",
        max_prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        max_total_tokens: int | None = None,
    ) -> "LengthStats":
        """Read the pairs from a CSV with a header (Vidur / Sarathi-Serve ``*_stats_*.csv`` by default).

        Rows whose prompt, output or prompt+output exceed the given caps are dropped (not clipped), so
        the kept pairs are real ones. Bad rows raise :class:`TraceError` with the file and line.
        """
        max_prompt_tokens = _opt_pos_int("max_prompt_tokens", max_prompt_tokens)
        max_output_tokens = _opt_pos_int("max_output_tokens", max_output_tokens)
        max_total_tokens = _opt_pos_int("max_total_tokens", max_total_tokens)
        spath = os.fspath(path)
        prompts: list[int] = []
        outputs: list[int] = []
        with open(spath, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            ip = io_ = None
            for row in rows:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if ip is None:
                    cols = [c.strip() for c in row]
                    for col in (prompt_column, output_column):
                        if col not in cols:
                            raise TraceError(spath, rows.line_num, col, f"column missing from header {','.join(row)!r}", "missing_field")
                    ip, io_ = cols.index(prompt_column), cols.index(output_column)
                    continue
                vals = []
                for i, col in ((ip, prompt_column), (io_, output_column)):
                    if i >= len(row):
                        raise TraceError(spath, rows.line_num, col, f"row has only {len(row)} columns", "bad_csv")
                    s = row[i].strip()
                    try:
                        x = float(s)
                    except ValueError:
                        raise TraceError(spath, rows.line_num, col, f"not a number: {s!r}", "bad_csv") from None
                    if not x.is_integer():
                        raise TraceError(spath, rows.line_num, col, f"must be an integer, got {s!r}", "non_integer")
                    if x <= 0:
                        raise TraceError(spath, rows.line_num, col, f"must be a positive integer, got {s!r}", "non_positive")
                    vals.append(int(x))
                p, o = vals
                if max_prompt_tokens is not None and p > max_prompt_tokens:
                    continue
                if max_output_tokens is not None and o > max_output_tokens:
                    continue
                if max_total_tokens is not None and p + o > max_total_tokens:
                    continue
                prompts.append(p)
                outputs.append(o)
        if not prompts:
            raise ConfigError(f"{spath}: no (prompt, output) pairs left after the caps")
        return cls(prompts, outputs, name=os.path.basename(spath))

    @classmethod
    def from_requests(cls, requests: Iterable[Request | InvalidRecord], *, name: str = "") -> "LengthStats":
        """The (prompt, output) pairs of a trace, e.g. ``LengthStats.from_requests(read_trace(path))``."""
        from array import array

        p, o = array("q"), array("q")
        for r in requests:
            if isinstance(r, InvalidRecord):
                continue
            p.append(r.prompt_tokens)
            o.append(r.output_tokens)
        return cls(np.frombuffer(p, dtype=np.int64), np.frombuffer(o, dtype=np.int64), name=name)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, self.prompt_tokens.size, size=n)
        return self.prompt_tokens[idx], self.output_tokens[idx]

    def quantiles(self, k: int = 20) -> tuple[list[int], list[int]]:
        """Prompt and output quantiles at probabilities 0, 1/k, ..., 1 (for :class:`QuantileLengths`)."""
        q = np.linspace(0.0, 1.0, _pos_int("k", k) + 1)
        return (
            [int(round(x)) for x in np.quantile(self.prompt_tokens, q)],
            [int(round(x)) for x in np.quantile(self.output_tokens, q)],
        )


class QuantileLengths:
    """Prompt and output lengths drawn independently from piecewise-linear quantile functions.

    ``prompt_quantiles[i]`` is the prompt length at probability ``i / (len - 1)`` (0 = minimum,
    last = maximum); a draw is ``round(interp(u, probs, quantiles))`` with ``u ~ U(0, 1)``. With
    *max_total_tokens*, pairs with prompt + output above it are redrawn (rejection sampling).
    """

    def __init__(
        self,
        prompt_quantiles: Sequence[float],
        output_quantiles: Sequence[float],
        *,
        max_total_tokens: int | None = None,
    ):
        self.prompt_quantiles = np.asarray(prompt_quantiles, dtype=float)
        self.output_quantiles = np.asarray(output_quantiles, dtype=float)
        for name, q in (("prompt_quantiles", self.prompt_quantiles), ("output_quantiles", self.output_quantiles)):
            if q.ndim != 1 or q.size < 2:
                raise ConfigError(f"{name} needs at least 2 values (minimum and maximum)")
            if not np.all(np.isfinite(q)) or q[0] < 1 or np.any(np.diff(q) < 0):
                raise ConfigError(f"{name} must be finite, >= 1 and non-decreasing, got {q.tolist()}")
        self.max_total_tokens = _opt_pos_int("max_total_tokens", max_total_tokens)
        if self.max_total_tokens is not None and self.prompt_quantiles[0] + self.output_quantiles[0] > self.max_total_tokens:
            raise ConfigError("max_total_tokens is below the smallest possible prompt + output")
        self._pp = np.linspace(0.0, 1.0, self.prompt_quantiles.size)
        self._po = np.linspace(0.0, 1.0, self.output_quantiles.size)

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = rng.random((2, n))
        p = np.rint(np.interp(u[0], self._pp, self.prompt_quantiles)).astype(np.int64)
        o = np.rint(np.interp(u[1], self._po, self.output_quantiles)).astype(np.int64)
        return p, o

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p, o = self._draw(rng, n)
        cap = self.max_total_tokens
        if cap is None:
            return p, o
        keep = (p + o) <= cap
        p, o = p[keep], o[keep]
        tries = 0
        while p.size < n:
            tries += 1
            if tries > 1000:
                raise ConfigError(f"max_total_tokens={cap} rejects nearly all draws")
            p2, o2 = self._draw(rng, max(n - p.size, 1024))
            keep = (p2 + o2) <= cap
            p, o = np.concatenate([p, p2[keep]]), np.concatenate([o, o2[keep]])
        return p[:n], o[:n]

    def __repr__(self) -> str:
        return (
            f"QuantileLengths(prompt_quantiles={self.prompt_quantiles.tolist()}, "
            f"output_quantiles={self.output_quantiles.tolist()}, max_total_tokens={self.max_total_tokens})"
        )


def synthetic_requests(
    num_requests: int | None,
    rate_per_s: float,
    *,
    seed: int = 0,
    arrival: str = "poisson",
    cv: float = 1.0,
    lengths: RequestLengths | None = None,
    start_time_s: float = 0.0,
    id_prefix: str = "",
) -> Iterator[Request]:
    """Yield *num_requests* synthetic requests (None: an endless stream) arriving at *rate_per_s* on average.

    *arrival*: ``"poisson"`` (exponential gaps), ``"gamma"`` (gamma gaps with coefficient of
    variation *cv* and mean ``1/rate_per_s``: shape ``1/cv**2``; ``cv=1`` is Poisson in distribution,
    ``cv>1`` burstier, ``cv<1`` smoother) or ``"constant"`` (gap exactly ``1/rate_per_s``).
    The first request arrives one gap after *start_time_s*. *lengths* is a length sampler
    (default ``FixedLengths(512, 128)``). Request ids are ``f"{id_prefix}{i}"`` for i = 0, 1, ...

    Deterministic for a given seed and parameters. The arguments are checked at call time.
    """
    if num_requests is not None:
        if type(num_requests) is not int or num_requests < 0:
            raise ConfigError(f"num_requests must be a non-negative integer or None, got {num_requests!r}")
    try:
        rate = float(rate_per_s)
    except (TypeError, ValueError):
        raise ConfigError(f"rate_per_s must be a positive number, got {rate_per_s!r}") from None
    if not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
    if arrival not in ARRIVALS:
        raise ConfigError(f"unknown arrival process {arrival!r}; known: {', '.join(ARRIVALS)}")
    cv = float(cv)
    if arrival == "gamma" and not (cv > 0 and math.isfinite(cv)):
        raise ConfigError(f"cv must be a positive number for gamma arrivals, got {cv!r}")
    start = float(start_time_s)
    if not (start >= 0 and math.isfinite(start)):
        raise ConfigError(f"start_time_s must be a finite number >= 0, got {start_time_s!r}")
    if lengths is None:
        lengths = FixedLengths(512, 128)
    elif not callable(getattr(lengths, "sample", None)):
        raise ConfigError(f"lengths must have a sample(rng, n) method, got {lengths!r}")
    if type(seed) is not int:
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return _generate(num_requests, rate, seed, arrival, cv, lengths, start, str(id_prefix))


def _generate(num_requests, rate, seed, arrival, cv, lengths, start, id_prefix) -> Iterator[Request]:
    arrival_ss, length_ss = np.random.SeedSequence(seed).spawn(2)
    rng_a = np.random.default_rng(arrival_ss)
    rng_l = np.random.default_rng(length_ss)
    mean_gap = 1.0 / rate
    shape = 1.0 / (cv * cv) if arrival == "gamma" else 0.0
    t = start
    i = 0
    while num_requests is None or i < num_requests:
        # Always draw full chunks, so request k is the same whatever num_requests is.
        if arrival == "poisson":
            times = t + np.cumsum(rng_a.exponential(mean_gap, CHUNK))
        elif arrival == "gamma":
            times = t + np.cumsum(rng_a.gamma(shape, mean_gap / shape, CHUNK))
        else:  # constant: index-based, so no rounding drift
            times = start + np.arange(i + 1, i + CHUNK + 1, dtype=np.float64) * mean_gap
        t = float(times[-1])
        p, o = lengths.sample(rng_l, CHUNK)
        p = np.asarray(p)
        o = np.asarray(o)
        if p.shape != (CHUNK,) or o.shape != (CHUNK,):
            raise ConfigError(f"length sampler {lengths!r} returned arrays of shape {p.shape}, {o.shape}; wanted ({CHUNK},)")
        if p.min() <= 0 or o.min() <= 0:
            raise ConfigError(f"length sampler {lengths!r} returned non-positive lengths")
        m = CHUNK if num_requests is None else min(CHUNK, num_requests - i)
        ids = map(str, range(i, i + m)) if not id_prefix else (id_prefix + str(k) for k in range(i, i + m))
        for rid, at, pt, ot in zip(ids, times[:m].tolist(), p[:m].tolist(), o[:m].tolist()):
            yield Request(rid, at, pt, ot)
        i += m


def rescale_arrivals(requests: Iterable[Request | InvalidRecord], rate_scale: float) -> Iterator[Request | InvalidRecord]:
    """Yield copies of *requests* with arrival times divided by *rate_scale* (2.0 = twice the request rate).

    Other fields are unchanged; :class:`InvalidRecord` items pass through (their known arrival scaled too).
    """
    try:
        s = float(rate_scale)
    except (TypeError, ValueError):
        raise ConfigError(f"rate_scale must be a positive number, got {rate_scale!r}") from None
    if not (s > 0 and math.isfinite(s)):
        raise ConfigError(f"rate_scale must be a positive number, got {rate_scale!r}")
    return _rescale(requests, s)


def _rescale(requests, s: float):
    for r in requests:
        if isinstance(r, InvalidRecord):
            t = None if r.arrival_time_s is None else r.arrival_time_s / s
            yield InvalidRecord(r.path, r.line, r.field, r.reason, r.code, t)
        else:
            yield Request(
                r.request_id, r.arrival_time_s / s, r.prompt_tokens, r.output_tokens, r.prefix_hashes, r.hash_block_tokens, r.source
            )


def head(requests: Iterable, n: int) -> Iterator:
    """The first *n* items of *requests* (lazily, like ``itertools.islice``)."""
    if type(n) is not int or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    return itertools.islice(requests, n)
