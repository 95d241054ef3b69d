"""Timing one kernel (gpt-fast style): warm-up calls, then on CUDA one pair of CUDA events around each
repeat (``torch.cuda.synchronize()`` before and after), on CPU ``time.perf_counter_ns`` around each call;
the caller records the median of the repeats. Inputs are rotated: a point builds as many independent
input sets as it takes to exceed twice the last-level cache, and repeat i uses set i mod n, so no repeat
finds its operands already in cache."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def last_level_cache_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    for idx in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size").read_text().strip()
            return int(text[:-1]) * (1024 if text.endswith("K") else 2**20) if text[-1] in "KM" else int(text)
        except (OSError, ValueError):
            continue
    return 32 * 2**20


def time_calls(fn, arg_sets: list, device: str, grid) -> list[float]:
    """Seconds per call: warm-up, one call that sizes the repeats (and warms up too), then ``reps`` timed
    calls rotating over the input sets."""
    n = len(arg_sets)
    cuda = device.startswith("cuda")
    for i in range(grid.warmup):
        fn(*arg_sets[i % n])
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*arg_sets[0])
        end.record()
        torch.cuda.synchronize()
        first = start.elapsed_time(end) * 1e-3
    else:
        t0 = time.perf_counter_ns()
        fn(*arg_sets[0])
        first = (time.perf_counter_ns() - t0) * 1e-9
    reps = max(grid.min_reps, min(grid.max_reps, math.ceil(grid.target_s / max(first, 1e-7))))
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for i in range(reps):
            args = arg_sets[(i + 1) % n]
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    out = []
    for i in range(reps):
        args = arg_sets[(i + 1) % n]
        t0 = time.perf_counter_ns()
        fn(*args)
        out.append((time.perf_counter_ns() - t0) * 1e-9)
    return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "not enough memory" in msg
                                              or "can't allocate memory" in msg or "failed to allocate" in msg)
