"""``kvprof replay``: serve a trace on a real engine (a random-weight Llama in torch, a paged KV cache,
the compression methods as real kernels, kvsim's own scheduler) and write a measured validation case.

Modules: ``model`` (the Llama forward), ``kvstore`` (physical KV caches per method), ``engine`` (the
real-time loop around kvsim's Replica/Scheduler/KVCacheManager), ``cli`` (options and outputs).
See docs/replay.md.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from profiler.replay.cli import main as _main

    return _main(argv)
