"""Measured TTFT and TPOT p50 of the H100 runs by load: each request's mean number of requests in their
decode phase while it decodes (from the measured first-token and finish times), in buckets. Shows the
step time growing with the batch and TTFT growing by more than the residual of one step (docs/fidelity.md
section 7.2: asynchronous scheduling).

    python results/validation/ttft_by_load.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3] / "shared" / "validation"
BUCKETS = [(0, 8), (8, 12), (12, 16), (16, 20), (20, 25), (25, 30), (30, 40), (40, 60), (60, 90), (90, 130)]


def main() -> int:
    dirs = sorted(ROOT.glob("ist_h100_*"))
    if not dirs:
        print(f"skipped: no cases under {ROOT}")
        return 0
    for d in dirs:
        rows = list(csv.DictReader(open(d / "measured.csv")))
        a = np.array([float(r["arrival_time_s"]) for r in rows])
        first = a + np.array([float(r["ttft_ms"]) for r in rows]) / 1e3
        fin = a + np.array([float(r["e2el_ms"]) for r in rows]) / 1e3
        ttft = np.array([float(r["ttft_ms"]) for r in rows])
        tpot = np.array([float(r["tpot_ms"]) for r in rows])
        ev = np.concatenate([first, fin])
        order = np.argsort(ev, kind="stable")
        ev = ev[order]
        running = np.cumsum(np.concatenate([np.ones(len(rows)), -np.ones(len(rows))])[order])
        conc = np.array([running[np.searchsorted(ev, np.linspace(f, e, 20), side="right") - 1].mean()
                         for f, e in zip(first, fin)])
        print(d.name)
        for lo, hi in BUCKETS:
            m = (conc >= lo) & (conc < hi)
            if m.sum() > 20:
                print(f"  {lo:3d}-{hi:3d} decoding: {m.sum():5d} requests, mean {conc[m].mean():5.1f}, "
                      f"TPOT p50 {np.median(tpot[m]):6.2f} ms, TTFT p50 {np.median(ttft[m]):6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
