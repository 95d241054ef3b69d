"""The roofline, vectorised over a table's points: the same formulas as
:class:`kvsim.cost.roofline.RooflineCost` (tests/test_calibrate.py checks they agree), so a fit can
evaluate thousands of points per parameter trial; and the fitted parameters with their bounds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvsim.cost.roofline import RooflineParams

if TYPE_CHECKING:
    from kvsim.cost.calibrate.data import OpTable

#: time a real step spends outside its kernels; not visible in kernel timings, so not fitted.
#: layer: 0. vLLM replays decode steps from CUDA graphs, where kernels follow each other without launch
#: gaps: kvprof's whole-step timings on an H200 (kvsim/profiles/kvprof/raw/h200__*__step.jsonl, `kvprof step`)
#: put a Llama-2-7B decode step of ~1,200 kernels at batch 1 at 6.1 ms in a graph against 20.6 ms eager,
#: and what the graph leaves beyond the weight-streaming GEMMs is ~2 us per small kernel, no more than
#: such a kernel's own duration (elem_overhead_s, fitted on kernel timings: 2.2 us on h100). So the
#: per-kernel fixed times already charged cover it (docs/fidelity.md, "Per-step and per-layer time").
#: step: host-to-device copies of the step's inputs and the sampled-token copy back (~0.2 ms), with
#: vLLM V1's asynchronous scheduling hiding the rest of the host work behind the GPU.
A_PRIORI = {"layer_overhead_s": 0.0, "step_overhead_s": 0.2e-3}


#: fitted parameter -> (lower, upper bound, which data identify it)
PARAMS = {
    "eff_flops": (0.05, 1.0, "gemm"),
    "gemm_half_tokens": (0.0, 2048.0, "gemm"),
    # no GPU streams more than ~95 % of its datasheet DRAM bandwidth (decode attention on an H200 tops
    # out at 0.95, HOPPER_DECODE); without the bound the h100 fit ran to 1.0, a direction its data
    # hardly see (the GEMM compute floor explains the same small-T times)
    "eff_mem": (0.05, 0.95, "gemm"),
    "kernel_overhead_s": (0.0, 60e-6, "gemm"),
    "eff_elem": (0.02, 4.0, "mem"),
    "elem_overhead_s": (0.0, 30e-6, "mem"),
    "eff_attn_flops": (0.02, 1.0, "attn"),
    "eff_attn_mem": (0.05, 1.0, "attn"),
    "attn_q_tile": (1.0, 256.0, "attn"),
    "attn_ctas": (1.0, 2048.0, "attn"),
    "attn_seq_overhead_s": (0.0, 5e-6, "attn"),
    "attn_overhead_s": (0.0, 60e-6, "attn"),
    "eff_comm": (0.01, 2.0, "comm"),
    "allreduce_latency_s": (0.0, 300e-6, "comm"),
}


NAMES = list(PARAMS)


#: profile ``decode_skew_alpha`` key -> roofline parameter; closed-form least squares in the importer, so
#: they are averaged over a hardware's profiles here rather than refitted
SKEW = {"decode": "attn_skew_decode", "mixed": "attn_skew_mixed"}


def predict(tab: OpTable, p: RooflineParams, legacy: bool = False, sel=None) -> np.ndarray:
    """Roofline time of each point. ``legacy``: the roofline as it was before calibration (one kernel
    overhead per operation, flat GEMM efficiency, one bandwidth for weights and KV, ideal links)."""
    F, B, T, nk, Q, S = tab.F, tab.B, tab.T, tab.nk, tab.Q, tab.S
    if sel is not None:
        F, B, T, nk, Q, S = F[sel], B[sel], T[sel], nk[sel], Q[sel], S[sel]
    ko = p.kernel_overhead_s
    if legacy:
        nk = np.ones_like(nk)
    if tab.kind == "gemm":
        tf = F / (tab.peak_flops * p.eff_flops)
        if p.gemm_half_tokens and not legacy:
            tf = tf * (1.0 + p.gemm_half_tokens / np.maximum(T, 1e-9))
        return np.maximum(tf, B / (tab.mem_bw * p.eff_mem)) + nk * ko
    if tab.kind == "mem":
        if legacy:
            return B / (tab.mem_bw * p.eff_mem) + nk * ko
        eel = p.eff_mem if p.eff_elem is None else p.eff_elem
        eko = ko if p.elem_overhead_s is None else p.elem_overhead_s
        return B / (tab.mem_bw * eel) + nk * eko
    if tab.kind == "attn_mixed":
        Fd, Bd, Sd = tab.Fd, tab.Bd, tab.Sd
        if sel is not None:
            Fd, Bd, Sd = Fd[sel], Bd[sel], Sd[sel]
        eam = p.eff_mem if (legacy or p.eff_attn_mem is None) else p.eff_attn_mem
        rate = tab.peak_flops * p.eff_attn_flops
        if legacy:  # the previous kvsim: two separate calls, as for pure prefill and pure decode
            return (np.maximum(F / rate, B / (tab.mem_bw * p.eff_mem)) + np.maximum(Fd / rate, Bd / (tab.mem_bw * p.eff_mem))
                    + 2 * nk * ko)
        if p.attn_q_tile or p.attn_ctas:
            F = F * prefill_flops_factor(Q, tab.heads, p.attn_q_tile, p.attn_ctas)
            rows = tab.heads * Sd * max(1.0, p.attn_q_tile)
            Fd = Fd * np.maximum(rows, p.attn_ctas * p.attn_q_tile) / (tab.heads * Sd)
        fixed = nk * ko if p.attn_overhead_s is None else p.attn_overhead_s
        return (np.maximum(F / rate, B / (tab.mem_bw * eam)) + np.maximum(Fd / rate, Bd / (tab.mem_bw * eam))
                + (1 + Sd) * p.attn_seq_overhead_s + fixed)
    if tab.kind == "attn":
        if legacy:
            return np.maximum(F / (tab.peak_flops * p.eff_attn_flops), B / (tab.mem_bw * p.eff_mem)) + nk * ko
        eam = p.eff_mem if p.eff_attn_mem is None else p.eff_attn_mem
        if p.attn_q_tile or p.attn_ctas:
            F = F * np.where(Q > 0, prefill_flops_factor(Q, tab.heads, p.attn_q_tile, p.attn_ctas), 1.0)
        fixed = nk * ko if p.attn_overhead_s is None else p.attn_overhead_s
        return (np.maximum(F / (tab.peak_flops * p.eff_attn_flops), B / (tab.mem_bw * eam))
                + S * p.attn_seq_overhead_s + fixed)
    g = tab.group
    eff = 1.0 if legacy else p.eff_comm
    return p.allreduce_latency_s + 2.0 * (g - 1) / g * B / (tab.link_bw * eff)


def prefill_flops_factor(q, heads, tile, ctas):
    """Work of a prefill attention call relative to its causal FLOPs: a chunk of q queries per head runs
    as max(q, tile) query rows (a partial tile costs a whole one), and fewer than ``ctas`` tiles in
    flight leave the GPU partly idle, so the call takes as long as ``ctas`` tiles would."""
    q = np.maximum(q, 1e-9)
    rows = heads * np.maximum(q, tile)
    return np.maximum(rows, ctas * tile) / (heads * q)


def _errors(tab: OpTable, p: RooflineParams, legacy: bool = False) -> np.ndarray:
    return (predict(tab, p, legacy) / tab.measured - 1.0) * 100.0


#: where each parameter sits when the data say nothing about it: a weak pull (``PRIOR_WEIGHT``) towards a
#: physical value makes the least-squares minimum unique, so a rerun reproduces the fit and directions
#: the data leave flat (for one, the query tile and the wave floor enter prefill attention only as their
#: product when every chunk is longer than a tile) take these values instead of wherever the optimiser
#: stopped. Values: typical achieved fractions of datasheet peaks; FlashAttention's query tile of 64 rows;
#: about one attention tile per SM in flight (128); a few microseconds per kernel.
PRIOR = {"eff_flops": 0.7, "gemm_half_tokens": 64.0, "eff_mem": 0.85, "kernel_overhead_s": 4e-6, "eff_elem": 1.0,
         "elem_overhead_s": 2e-6, "eff_attn_flops": 0.5, "eff_attn_mem": 0.85, "attn_q_tile": 64.0, "attn_ctas": 128.0,
         "attn_seq_overhead_s": 1e-7, "attn_overhead_s": 8e-6, "eff_comm": 0.8, "allreduce_latency_s": 20e-6}


#: a parameter e times its prior costs as much as a 1 % log-time error over one table; data that
#: determine a parameter move it far more than that
PRIOR_WEIGHT = 0.01


#: where a fit starts for a parameter that is off or unset
