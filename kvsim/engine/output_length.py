"""Per-request output length under a compression method: the trace's length times a sampled ratio."""

from __future__ import annotations

import math

import numpy as np

from kvsim.methods.base import LengthRatio


class LengthSampler:
    """Draws one ratio per request, in arrival order, from the run's seed (deterministic)."""

    def __init__(self, dist: LengthRatio, seed: int):
        self.dist = dist
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6C656E]))
        self._identity = not dist.samples and dist.sigma == 0.0 and dist.mean_ratio == 1.0
        self._samples = np.asarray(dist.samples, dtype=float) if dist.samples else None
        self._mu = math.log(dist.mean_ratio) - dist.sigma**2 / 2 if dist.mean_ratio > 0 else 0.0

    def output_tokens(self, trace_output_tokens: int) -> int:
        if self._identity:
            return trace_output_tokens
        if self._samples is not None:
            r = float(self._samples[self._rng.integers(len(self._samples))])
        else:
            r = float(self._rng.lognormal(self._mu, self.dist.sigma)) if self.dist.sigma else self.dist.mean_ratio
        return max(1, round(trace_output_tokens * r))
