"""Replay speed and memory. Prints numbers; asserts nothing (shared machines are noisy).

    python benchmarks/replay_speed.py azure      # ../shared Azure conv trace (19,366 requests), llama-3.1-8b / h100
    python benchmarks/replay_speed.py synthetic --num-requests 1000000

Targets (issue 2): the Azure replay under 2 s wall on a 2-core machine; 1 M synthetic requests under
2 minutes with peak memory that does not grow with trace length (compare --num-requests 100000 and
1000000: the trace is streamed, per-request rows are written out, percentiles are bounded-memory).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from kvsim import api
from kvsim.config import EngineConfig
from kvsim.workload.synthetic import FixedLengths, UniformLengths, synthetic_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AZURE_CONV = SHARED / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(label: str, res, wall: float) -> None:
    s = res.summary
    print(f"{label}: wall {wall:.2f} s | {s['num_requests'] / wall:,.0f} simulated requests/s | "
          f"engine steps {s['sim']['engine_steps']:,} | events {s['sim']['events']:,} | "
          f"fast-forward stretches {s['sim']['fast_forward_stretches']:,} | peak RSS {peak_rss_mb():.0f} MB")
    print(f"  completed {s['completed']} rejected {s['rejected']}  output_throughput {s['output_throughput']:.1f} tok/s  "
          f"ttft p99 {s['ttft_ms']['p99']:.1f} ms  tpot p50 {s['tpot_ms']['median']:.2f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["azure", "synthetic"])
    p.add_argument("--num-requests", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None, help="also write outputs (requests.csv etc.) to this folder")
    a = p.parse_args(argv)
    if a.which == "azure":
        if not AZURE_CONV.exists():
            print(f"skipped: {AZURE_CONV} absent")
            return 0
        best = None
        for _ in range(a.repeat):
            t = time.perf_counter()
            res = api.replay(AZURE_CONV, model="llama-3.1-8b", hardware="h100", out_dir=a.out, plot=False, keep_rows=False)
            wall = time.perf_counter() - t
            best = min(best or wall, wall)
        report(f"azure conv x{a.repeat} (best)", res, best)
        return 0
    reqs = synthetic_requests(a.num_requests, a.rate, seed=1, lengths=UniformLengths(64, 2048, 16, 512))
    t = time.perf_counter()
    res = api.replay(reqs, model="llama-3.1-8b", hardware="h100", out_dir=a.out, plot=False, keep_rows=False,
                     config=EngineConfig(num_replicas=4))
    report(f"synthetic {a.num_requests:,} requests at {a.rate}/s on 4 replicas", res, time.perf_counter() - t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
