"""The Hopper kernel evidence docs/fidelity.md section 7.1 quotes, recomputed from committed files.

    python results/validation/hopper_evidence.py

1. Vidur's H100 GEMMs at 1-16 tokens, TP 1-8: least squares of log t = log(bytes / (W eff) + n c).
2. kvprof's whole decode steps on an H200 (eager vs CUDA graph), and what a graph replay leaves per small
   kernel once the GEMMs (weights at eff of the H200's bandwidth, c per GEMM kernel) and the KV read are
   taken out, for the range of GEMM efficiencies the GEMM evidence allows.
3. kvprof's H200 decode attention over a contiguous cache: fixed, per-sequence and bandwidth terms.
4. How many of kvprof's H200 GEMM points enter the h100 fit (compute-bound, clear of the launch floor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from kvsim.cost import calibrate as C
from kvsim.cost.profile import load_profile
from kvsim.specs.model import load_model

ROOT = Path(__file__).resolve().parents[2]
H100_BW, H200_BW = 3.35e12, 4.8e12


def vidur_small_gemms():
    xs, ns, ys = [], [], []
    h, i, q = 4096, 11008, 4096 * 3
    for tp in (1, 2, 4, 8):
        prof = load_profile(ROOT / f"kvsim/profiles/imported/h100__llama-2-7b__tp{tp}.json")
        for op, nbytes, n in (("qkv", h * q * 2 / tp, 1), ("o", h * h * 2 / tp, 1), ("mlp", 3 * h * i * 2 / tp, 3)):
            t = float(np.median([prof.tables[f"linear.{op}"].lookup_at(T) for T in (1, 2, 4, 8, 16)]))
            xs.append(nbytes)
            ns.append(n)
            ys.append(t)
    x, n, y = map(np.asarray, (xs, ns, ys))
    r = least_squares(lambda p: np.log(x / (H100_BW * p[0]) + n * p[1] * 1e-6) - np.log(y), [0.8, 5.0])
    print(f"1. Vidur H100 GEMMs, 1-16 tokens, TP 1-8 ({len(y)} ops): eff_mem {r.x[0]:.3f} of 3.35 TB/s, "
          f"{r.x[1]:.2f} us per kernel, rms log error {np.sqrt(np.mean(r.fun ** 2)):.3f}")


def graph_steps():
    print("2. kvprof step on an H200, batch 1, 512 tokens of context:")
    for name in ("llama-2-7b", "llama-3.1-8b"):
        lines = [json.loads(s) for s in (ROOT / f"kvsim/profiles/kvprof/raw/h200__{name}__step.jsonl").read_text().splitlines()]
        pt = next(p for p in lines if p.get("record") == "point" and p["batch_size"] == 1 and p["kv_tokens"] == 512)
        m = load_model(name)
        h, q, k, i = m.hidden_size, m.q_size, m.kv_size, m.intermediate_size
        gemm_bytes = m.num_layers * 2 * h * (q + 2 * k + q + 3 * i) + 2 * h * m.vocab_size
        kv_bytes = m.num_layers * 2 * k * 2 * 513
        # per layer: rms_norm 8, rotary 5 + 5, two cache writes, SDPA ~1.5, two residual adds, silu and
        # mul: ~33.5 small kernels and 4 GEMMs (profiler/kernels/step.py, ops.py); final norm 8, LM head 1
        small = m.num_layers * 33.5 + 8
        gemms = m.num_layers * 4 + 1
        for eff in (0.7, 0.8, 0.9):
            rest = pt["graph_median_s"] - gemm_bytes / (H200_BW * eff) - gemms * 5e-6 - kv_bytes / (H200_BW * 0.95)
            print(f"   {name}: eager {pt['eager_median_s'] * 1e3:.1f} ms, graph {pt['graph_median_s'] * 1e3:.2f} ms; "
                  f"GEMMs at {eff} of peak + 5 us each -> {rest / small * 1e6:.2f} us per small kernel")


def decode_attention():
    r = C.hopper_decode_efficiency()
    print(f"3. H200 contiguous decode, {r['points']} points >= 512 MB: {r['attn_overhead_s'] * 1e6:.1f} us + "
          f"{r['attn_seq_overhead_s'] * 1e9:.0f} ns x sequences + KV / (4.8 TB/s x {r['eff_attn_mem']:.3f}); "
          f"median |error| {r['median_abs_pct']:.1f} %, p90 {r['p90_abs_pct']:.1f} %")


def hopper_gemms():
    ts = C.load_hopper_gemms()
    print(f"4. kvprof H200 GEMM points in the h100 fit: {sum(len(t.measured) for t in ts)} "
          f"({', '.join(f'{t.model} {t.op} {len(t.measured)}' for t in ts)})")


if __name__ == "__main__":
    vidur_small_gemms()
    graph_steps()
    decode_attention()
    hopper_gemms()
