"""The full cache in kvprof: vLLM's paged decode attention (kernels), the plain paged store (replay),
nothing evicted (lengths)."""

from __future__ import annotations

from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import PagedStore


class NoCompression(MethodSupport):
    name = "none"
    store = PagedStore
