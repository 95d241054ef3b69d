"""Models and TP degrees the public runs do not have (docs/fidelity.md section 7.7): Llama-2-70B at TP 4
and CodeLlama-34B at TP 2 on one H100 node, driven by the arrivals and prompt cycle of the public
Llama-2-7B "general" run (8 then 20 req/s; nothing measured about these models is used; KV capacity
estimated by kvsim). Prints kvsim's TTFT p50 per 100 s of arrivals and the decode throughput at 100
and 128 sequences of 700 tokens.

    python results/validation/unseen_tp.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from kvsim import api
from kvsim.cost.base import StepShape
from kvsim.validate import load_case, resolve_spec, simulate

CASE = Path(__file__).resolve().parents[3] / "shared" / "validation" / "ist_h100_llama-2-7b-tp1-general"


def main() -> int:
    if not CASE.is_dir():
        print(f"skipped: {CASE} absent")
        return 0
    for model, tp in (("llama-2-70b", 4), ("codellama-34b", 2)):
        case = load_case(CASE)
        case.model = model
        case.config = dataclasses.replace(case.config, tensor_parallel_size=tp, num_gpu_blocks_override=None)
        spec = resolve_spec(case)
        cost = api.make_cost(spec)
        thr = {b: b / cost.step_time_s(StepShape(b, b * 700, [])) for b in (100, 128)}
        _, rows, _ = simulate(case, spec)
        arr = {m["request_id"]: m["arrival_time_s"] for m in case.measured}
        a = np.array([arr[k] for k in rows])
        t = np.array([r["ttft_ms"] for r in rows.values()])
        wins = [f"{np.median(t[(a >= lo) & (a < lo + 100)]):.0f}" for lo in range(0, 1200, 100)]
        print(f"{model} TP{tp}: decode {thr[100]:,.0f} tok/s at 100 sequences, {thr[128]:,.0f} at 128 "
              f"(20 req/s x 248 tokens = 4,960 asked); TTFT p50 {np.median(t):.0f} ms (engine side, no client "
              f"overhead), max {t.max():.0f} ms; per 100 s window: {' '.join(wins)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
