"""Share of engine-step time by step shape in kvsim's own step log (``kvsim validate``'s steps.csv):
pure decode, prefill only, one prefill chunk with decodes (costed from a profile's measured mixed
calls), and two or more chunks with decodes (costed by composition; docs/fidelity.md, section 2.3).

    python results/validation/step_shapes.py [RESULTS_DIR]     # default results/validation/profile
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    results = Path(argv[0]) if argv else HERE / "profile"
    print("case  decode  prefill-only  1 chunk + decodes  2+ chunks + decodes   (% of step time; steps)")
    for steps in sorted(results.glob("*/steps.csv")):
        ms = {"decode": [0.0, 0], "prefill": [0.0, 0], "one": [0.0, 0], "multi": [0.0, 0]}
        with open(steps, newline="") as f:
            for r in csv.DictReader(f):
                chunks = [c for c in r["prefill_chunks"].split(";") if c]
                decodes = int(r["num_decode_seqs"]) > 0
                kind = ("decode" if not chunks else "prefill" if not decodes
                        else "one" if len(chunks) == 1 else "multi")
                ms[kind][0] += float(r["duration_ms"])
                ms[kind][1] += 1
        total = sum(v[0] for v in ms.values()) or 1.0
        cells = "  ".join(f"{100 * v[0] / total:5.1f}% ({v[1]})" for v in ms.values())
        print(f"{steps.parent.name}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
