"""Decode step time at equal batch, real engine vs kvsim, during a case's final drain (docs/fidelity.md,
section 4, DP2/EP2). The real engine's step time in a 1-s window is (running) / (generated tokens/s), from
its ``engine_timeseries.csv``; kvsim's is the mean duration of its pure-decode group steps starting in the
same window, with their mean total batch, from ``kvsim validate``'s ``steps.csv``.

    python results/validation/decode_drain.py                      # DP2/EP2, t = 44-61 s
    python results/validation/decode_drain.py CASE_ID T0 T1 [RESULTS_DIR]
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "validation"


def main(argv: list[str]) -> int:
    case = argv[0] if argv else "lss_rtxpro6000_qwen3-30b-a3b_dp2ep2"
    t0, t1 = (int(argv[1]), int(argv[2])) if len(argv) > 2 else (44, 61)
    results = Path(argv[3]) if len(argv) > 3 else HERE / "profile"
    measured = {}
    with open(SHARED / case / "engine_timeseries.csv", newline="") as f:
        for r in csv.DictReader(f):
            measured[int(float(r["t"]))] = (float(r["gen_throughput"]), int(r["running"]))
    # a lockstep group's ranks share a start time; keep the steps in which no rank prefills
    groups = defaultdict(list)
    with open(results / case / "steps.csv", newline="") as f:
        for r in csv.DictReader(f):
            groups[r["start_s"]].append(r)
    window = defaultdict(lambda: [0, 0.0, 0])  # decodes, ms, steps
    for start, rows in groups.items():
        if any(int(r["num_prefill_tokens"]) for r in rows):
            continue
        w = window[int(float(start)) + 1]  # the engine's window t covers [t-1, t)
        w[0] += sum(int(r["num_decode_seqs"]) for r in rows)
        w[1] += float(rows[0]["duration_ms"])
        w[2] += 1
    print("t_s  engine: running  ms/step | kvsim: mean batch  ms/step")
    for t in range(t0, t1 + 1):
        if t not in measured or not window[t][2]:
            continue
        tok_s, running = measured[t]
        d, ms, n = window[t]
        print(f"{t:3d}  {running:15d}  {running / tok_s * 1e3:7.1f} | {d / n:17.1f}  {ms / n:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
