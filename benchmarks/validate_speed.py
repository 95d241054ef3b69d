"""Speed of high-rate replays: engine steps simulated per second of wall time. Prints numbers; asserts
nothing (shared machines are noisy).

    python benchmarks/validate_speed.py synthetic   # no data needed: a 16,800-request H100 replay
    python benchmarks/validate_speed.py cases       # kvsim validate on each public case in ../shared

The H100 cases keep a step on almost every arrival (8 then 20 requests/s, 7-20 ms steps), so the
decode fast-forward rarely spans long stretches: what counts is the cost of one step. ``synthetic``
replays the same shape without the data: llama-2-7b on one H100, 8 req/s for 600 s then 20 req/s for
600 s (Poisson), prompts drawn from a cycle of 100 (575 +- 10 tokens, shared prefix hashes), 248
output tokens, vLLM 0.15's engine settings (max_num_seqs 128, max_num_batched_tokens 2048, async
scheduling).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from kvsim import api
from kvsim.config import EngineConfig
from kvsim.workload.request import Request

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "validation"


def synthetic(seed: int = 1) -> list[Request]:
    rng = random.Random(seed)
    lengths = [575 + rng.randint(-10, 10) for _ in range(100)]
    reqs, t, i = [], 0.0, 0
    for rate, dur in ((8.0, 600.0), (20.0, 600.0)):
        end = t + dur
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            k = i % 100
            p = lengths[k]
            hashes = tuple((k + 1) * (1 << 24) + j for j in range(p // 16))
            reqs.append(Request(f"r{i}", t, p, 248, hashes, 16))
            i += 1
    return reqs


def run_synthetic(repeat: int) -> None:
    reqs = synthetic()
    cfg = EngineConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=4096, async_scheduling=True)
    spec = api.make_spec("llama-2-7b", "h100", None, cfg, auto_profile=False)
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = api.replay([Request(r.request_id, r.arrival_time_s, r.prompt_tokens, r.output_tokens, r.prefix_hashes, 16)
                          for r in reqs], spec=spec, plot=False, keep_rows=False)
        wall = time.perf_counter() - t0
        best = wall if best is None else min(best, wall)
    s = res.summary
    steps = s["sim"]["engine_steps"]
    print(f"synthetic H100 replay, {len(reqs):,} requests (best of {repeat}): wall {best:.2f} s | "
          f"{steps / best:,.0f} engine steps/s | {len(reqs) / best:,.0f} requests/s | steps {steps:,} | "
          f"fast-forward stretches {s['sim']['fast_forward_stretches']:,}")


def run_cases() -> None:
    from kvsim.validate import load_case, validate_case

    dirs = sorted(SHARED.glob("ist_h100_*")) + sorted(SHARED.glob("lss_*"))
    if not dirs:
        print(f"skipped: no cases under {SHARED}")
        return
    total_steps = total_wall = 0.0
    for d in dirs:
        case = load_case(d)
        t0 = time.perf_counter()
        res = validate_case(case, None, plot=False)
        wall = time.perf_counter() - t0
        steps = res.summary["sim"]["engine_steps"]
        total_steps += steps
        total_wall += wall
        print(f"{case.case_id}: {len(case.measured):,} requests, {steps:,} steps in {wall:.2f} s "
              f"({steps / wall:,.0f} steps/s)")
    print(f"all {len(dirs)} cases: {total_steps:,.0f} steps in {total_wall:.1f} s ({total_steps / total_wall:,.0f} steps/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["synthetic", "cases"])
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    if a.which == "synthetic":
        run_synthetic(a.repeat)
    else:
        run_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
