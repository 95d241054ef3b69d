"""``kvsim calibrate``: fit the roofline's efficiency terms per hardware on real-GPU kernel timings.

Data: every profile in ``profiles/imported/`` (Vidur's and LLMServingSim's published per-operator
timings, see their provenance). Each table point is predicted by the roofline formulas of
:mod:`kvsim.cost.roofline` (same FLOP and byte counts, same kernel counts) and the parameters are fitted
by least squares on ``log(predicted) - log(measured)`` (scipy ``least_squares``), each (profile, table)
weighted equally whatever its number of points.

Fitted, per hardware (physical meaning in ``RooflineParams``):

    eff_flops, gemm_half_tokens   GEMM efficiency vs token count     linear.qkv/o/mlp/moe, linear.lm_head
    eff_mem                       streaming bandwidth (weights)      the same GEMMs at small T, linear.other,
                                                                     step.embedding/final_norm/sampler
    kernel_overhead_s             fixed time of one kernel           every op at small sizes
    eff_attn_flops, eff_attn_mem  attention kernels                  attention.prefill.flash, attention.decode.none
    eff_comm, allreduce_latency_s collectives                        comm.all_reduce (NCCL tables)
    attn_skew_decode, attn_skew_mixed  decodes of unequal context    the profiles' ``decode_skew_alpha``
                                                                     (LLMServingSim's skew.csv), averaged

A parameter whose data a hardware lacks (no attention or no all-reduce table) takes the ``default``
value, which is fitted on all hardware at once (efficiencies are fractions of each GPU's datasheet
peaks, so they carry over); ``default`` is also what kvsim uses for hardware without a fit.
``layer_overhead_s`` and ``step_overhead_s`` (time a real step spends outside its kernels) cannot be
seen in kernel timings and are set a priori (:data:`A_PRIORI`), never fitted.

Leave-one-out: for each (hardware, model) pair, everything is refitted without that pair's profiles
(the pair's hardware keeps its own fit only if other models on it remain, else it gets the default
fitted without it), and the withheld tables are predicted. Those params are stored under
``leave_one_out`` in calibration.yaml so ``kvsim validate --no-profile`` can replay a case with a
roofline that never saw its hardware-and-model timings.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kvsim.cost.roofline import KERNELS, RooflineCost, RooflineParams

#: time a real step spends outside its kernels; not visible in kernel timings, so not fitted.
#: layer: 0. vLLM replays decode steps from CUDA graphs, where kernels follow each other without launch
#: gaps: kvprof's whole-step timings on an H200 (profiles/kvprof/raw/h200__*__step.jsonl, `kvprof step`)
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
#: profile ``decode_skew_alpha`` key -> roofline parameter; closed-form least squares in the importer, so
#: they are averaged over a hardware's profiles here rather than refitted
SKEW = {"decode": "attn_skew_decode", "mixed": "attn_skew_mixed"}
#: where a fit starts for a parameter that is off or unset
START = {"gemm_half_tokens": 32.0, "eff_elem": 0.5, "elem_overhead_s": 3e-6, "eff_attn_mem": 0.8, "attn_q_tile": 64.0,
         "attn_ctas": 128.0, "attn_seq_overhead_s": 1e-7, "attn_overhead_s": 8e-6}
#: profile table -> operator name in reports
TABLE_OPS = {"linear.qkv": "qkv", "linear.o": "o", "linear.mlp": "mlp", "linear.moe": "moe",
             "linear.other": "other", "linear.lm_head": "lm_head", "step.embedding": "embedding",
             "step.final_norm": "final_norm", "step.sampler": "sampler", "attention.decode.none": "attn_decode",
             "attention.prefill.flash": "attn_prefill", "comm.all_reduce": "all_reduce"}
MAX_POINTS = 400  # per table in the fit (evenly thinned); errors are reported on every point
#: reported but not fitted: the profilers feed one repeated dummy token id, so the embedding gather
#: reads one cached row (LLMServingSim's times imply more than the GPU's DRAM bandwidth)
NOT_FITTED = {"embedding"}

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles" / "imported"
CALIBRATION_YAML = Path(__file__).resolve().parent / "calibration.yaml"
#: decode attention over a contiguous KV cache on an H200, timed by kvprof (docs/kvprof-kernels.md,
#: ``--contiguous-decode``): the traffic of an ideal paged kernel. Hopper has no attention table in the
#: imported profiles, so this sets h100's and h200's KV-read efficiency (a fraction of each chip's own peak:
#: same GH100 SMs and memory system, HBM3 vs HBM3e) instead of the default fitted on A40 and RTX GPUs
HOPPER_DECODE = PROFILES_DIR.parent / "kvprof" / "raw" / "h200__llama-2-7b__tp1__contiguous-decode.jsonl"
#: its points with at least this much KV per call: GPU-bound (125 us and more), clear of the eager
#: launch floor (~50 us) that the smaller points sit on
HOPPER_DECODE_MIN_BYTES = 512e6
#: GPUs of one die: h200 is an h100 with HBM3e (same SMs, NVLink and clocks); efficiencies, being
#: fractions of each GPU's own datasheet peaks, carry over
SAME_DIE = {"h200": "h100"}
#: what the H200 decode timings set for Hopper (``hopper_decode_efficiency``): the call's fixed time and
#: the time per sequence. Its KV-read efficiency (0.951) is that of a contiguous cache, an upper bound for
#: vLLM's paged kernel; paged kernels on the other GPUs reach 0.888 (the default fit). Within that range
#: the value is the one term of the cost model fitted on the public H100 serving runs, with a
#: leave-one-load-shape-out check (results/validation/h100_fit.py; docs/fidelity.md, section 6)
HOPPER_PARAMS = ("attn_overhead_s", "attn_seq_overhead_s")
HOPPER_PAGED_DECODE_EFF = 0.91


# ------------------------------------------------------------------------------------------------
# data: one OpTable per (profile, table), with the roofline's counts per point
@dataclass
class OpTable:
    profile: str
    hardware: str
    model: str
    tp: int
    op: str
    kind: str          # gemm | mem | attn | comm
    measured: np.ndarray
    coords: np.ndarray
    F: np.ndarray
    B: np.ndarray
    T: np.ndarray
    nk: np.ndarray
    Q: np.ndarray = None   # prefill chunk tokens (attention), else 0
    S: np.ndarray = None   # sequences in the attention call
    heads: float = 0.0     # query heads on one GPU
    group: int = 1
    peak_flops: float = 0.0
    mem_bw: float = 0.0
    link_bw: float = 0.0
    fit_mask: np.ndarray = field(default=None)
    Fd: np.ndarray = None  # mixed calls: the decode part's FLOPs, bytes and sequences
    Bd: np.ndarray = None
    Sd: np.ndarray = None

    @property
    def pair(self) -> tuple[str, str]:
        return (self.hardware, self.model)


def _kernels_from_mapping(entries) -> int:
    n = 0
    for e in entries or []:
        head = str(e).split(" x ", 1)
        n += int(head[0]) if len(head) == 2 and head[0].strip().isdigit() else 1
    return max(1, n)


def _grid_points(tab):
    """(coords array, values array) of the non-null points of a profile Table."""
    import itertools

    axes = [tab.axes[k] for k in tab.axis_names]
    coords, vals = [], []
    for idx in itertools.product(*[range(len(a)) for a in axes]):
        v = tab.value_at(*idx)
        if v is not None:
            coords.append([a[i] for a, i in zip(axes, idx)])
            vals.append(v)
    return np.asarray(coords, dtype=float), np.asarray(vals, dtype=float)


def load_tables(paths=None, mixed: bool = True) -> list[OpTable]:
    """Every profile's tables; with ``mixed``, also the mixed prefill + decode attention calls that
    LLMServingSim's attention.csv holds for the same (hardware, model, TP) (no profile table has them).
    With the default profiles, also the compute-bound GEMMs kvprof timed on an H200 (``load_hopper_gemms``)."""
    out = _load_profile_tables(paths)
    if mixed:
        have = {(t.hardware, t.model, t.tp) for t in out}
        out += [t for t in load_mixed_tables() if (t.hardware, t.model, t.tp) in have]
    if paths is None:
        out += load_hopper_gemms()
    return out


#: kvprof's H200 GEMM timings (torch 2.11, cuBLAS of CUDA 13) enter the h100 fit where they are
#: compute-bound, which is where an H200 is an H100 (same SMs, clocks and tensor peaks; only HBM
#: differs): points whose compute time is at least this multiple of their weight-streaming time at the
#: H200's bandwidth, and long enough (60 us) to be clear of the eager launch floor of kvprof's timing
HOPPER_GEMM_COMPUTE_RATIO = 1.5
HOPPER_GEMM_MIN_S = 60e-6
HOPPER_GEMM_PROFILES = ("h200__llama-2-7b__tp1.json", "h200__llama-3.1-8b__tp1.json")


def load_hopper_gemms() -> list[OpTable]:
    """The compute-bound points of kvprof's H200 linear tables, as h100 tables (peaks of an H100 SXM,
    the H200's own bandwidth for the memory term). The imported H100 tables are Vidur's, from an older
    eager stack whose mid-size GEMMs (128-512 tokens) run up to 1.5x slower than these."""
    from kvsim.cost.profile import load_profile
    from kvsim.methods.none import NoCompression
    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import load_model

    h100, h200 = load_hardware("h100"), load_hardware("h200")
    out = []
    for name in HOPPER_GEMM_PROFILES:
        path = PROFILES_DIR.parent / "kvprof" / name
        if not path.is_file():
            continue
        prof = load_profile(path)
        model = load_model(prof.model)
        tp = prof.tensor_parallel_size
        roof = RooflineCost(model, h200, NoCompression(), tp, RooflineParams())
        for tname in ("linear.qkv", "linear.o", "linear.mlp", "linear.lm_head"):
            tab = prof.tables.get(tname)
            if tab is None:
                continue
            op = TABLE_OPS[tname]
            coords, vals = _grid_points(tab)
            rows = []
            for (t,), v in zip(coords, vals):
                w = roof.linear_works(int(t))[op] if op != "lm_head" else roof.lm_head_work(int(t))
                compute = w.flops / (h100.fp16_flops * PRIOR["eff_flops"])
                memory = w.bytes / (h200.mem_bw_bytes_per_s * PRIOR["eff_mem"])
                if v >= HOPPER_GEMM_MIN_S and compute >= HOPPER_GEMM_COMPUTE_RATIO * memory:
                    rows.append((t, v, w.flops, w.bytes))
            if not rows:
                continue
            n = len(rows)
            out.append(OpTable(f"{prof.name} (H200, compute-bound points)", "h100", prof.model, tp, op, "gemm",
                               np.array([r[1] for r in rows]), np.array([[r[0]] for r in rows], dtype=float),
                               np.array([r[2] for r in rows]), np.array([r[3] for r in rows]),
                               np.array([r[0] for r in rows], dtype=float), np.full(n, KERNELS[op], dtype=float),
                               np.zeros(n), np.zeros(n), model.num_attention_heads / tp, 1, h100.fp16_flops,
                               h200.mem_bw_bytes_per_s, h100.interconnect_bw_bytes_per_s, np.ones(n, dtype=bool)))
    return out


def load_mixed_tables(perf_dir: Path | None = None) -> list[OpTable]:
    """Mixed attention calls (one prefill chunk and n decodes) from LLMServingSim's attention.csv."""
    from kvsim.methods.none import NoCompression
    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import load_model

    perf_dir = perf_dir or shared_dir() / "reference" / "llmservingsim" / "perf"
    meth = NoCompression()
    out = []
    for sub, (hw_name, model_name, tp) in LSS_ATTENTION.items():
        path = perf_dir / sub / "attention.csv"
        if not path.is_file():
            continue
        rows = []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                pc, kp, nd, kd = (int(r[k]) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode"))
                if pc > 0 and nd > 0:
                    rows.append((pc, kp, nd, kd, float(r["time_us"]) * 1e-6))
        if not rows:
            continue
        model, hw = load_model(model_name), load_hardware(hw_name)
        n = len(rows)
        F, B, Q, Fd, Bd, Sd = (np.zeros(n) for _ in range(6))
        for j, (pc, kp, nd, kd, _) in enumerate(rows):
            w = meth.prefill_attention_work(model, tp, pc, pc + kp)
            F[j], B[j], Q[j] = w.flops, w.bytes, pc
            w = meth.decode_attention_work(model, tp, nd, nd * (kd + 1))
            Fd[j], Bd[j], Sd[j] = w.flops, w.bytes, nd
        mask = np.zeros(n, dtype=bool)
        mask[np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int))] = True
        peak = hw.fp8_flops if (model.dtype_bytes == 1 and hw.fp8_flops) else hw.fp16_flops
        out.append(OpTable(f"llmservingsim {sub} mixed", hw_name, model_name, tp, "attn_mixed", "attn_mixed",
                           np.array([r[4] for r in rows]), np.array([r[:4] for r in rows], dtype=float), F, B, np.zeros(n),
                           np.full(n, KERNELS["attention"], dtype=float), Q, np.ones(n), model.num_attention_heads / tp,
                           1, peak, hw.mem_bw_bytes_per_s, hw.interconnect_bw_bytes_per_s, mask, Fd, Bd, Sd))
    return out


def _load_profile_tables(paths=None) -> list[OpTable]:
    from kvsim.cost.profile import load_profile
    from kvsim.methods.none import NoCompression
    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import load_model

    paths = sorted(paths) if paths is not None else sorted(PROFILES_DIR.glob("*.json"))
    out: list[OpTable] = []
    for path in paths:
        prof = load_profile(path)
        model, hw = load_model(prof.model), load_hardware(prof.hardware)
        tp = prof.tensor_parallel_size
        roof = RooflineCost(model, hw, NoCompression(), tp, RooflineParams())
        meth = NoCompression()
        mapping = (prof.provenance or {}).get("mapping") or {}
        peak = hw.fp8_flops if (model.dtype_bytes == 1 and hw.fp8_flops) else hw.fp16_flops
        for tname, op in TABLE_OPS.items():
            tab = prof.tables.get(tname)
            if tab is None:
                continue
            coords, vals = _grid_points(tab)
            if len(vals) == 0:
                continue
            n = len(vals)
            F, B, T, Q, S = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
            group = 1
            if op in ("qkv", "o", "mlp", "moe", "other"):
                kind = "mem" if op == "other" else "gemm"
                key = "mlp" if op == "moe" else op
                for j, (t,) in enumerate(coords):
                    w = roof.linear_works(int(t))[key]
                    F[j], B[j], T[j] = w.flops, w.bytes, t
                nk = _kernels_from_mapping(mapping.get(tname)) if tname in mapping else KERNELS[op]
                if op == "moe":
                    nk = KERNELS["moe"]
            elif op == "lm_head":
                kind, nk = "gemm", KERNELS["lm_head"]
                for j, (r,) in enumerate(coords):
                    w = roof.lm_head_work(int(r))
                    F[j], B[j], T[j] = w.flops, w.bytes, r
            elif op in ("embedding", "final_norm", "sampler"):
                kind, nk = "mem", KERNELS[op]
                for j, (x,) in enumerate(coords):
                    B[j] = roof.step_op_work(op, int(x)).bytes
            elif op == "attn_decode":
                kind, nk = "attn", KERNELS["attention"]
                for j, (b, kv) in enumerate(coords):
                    w = meth.decode_attention_work(model, tp, int(b), int(b) * kv)
                    F[j], B[j], S[j] = w.flops, w.bytes, b
            elif op == "attn_prefill":
                kind, nk = "attn", KERNELS["attention"]
                for j, (q, kv) in enumerate(coords):
                    w = meth.prefill_attention_work(model, tp, int(q), int(kv))
                    F[j], B[j], S[j], Q[j] = w.flops, w.bytes, 1, q
            else:  # all_reduce: one call of num_bytes over the profile's TP group
                kind, nk, group = "comm", 0, tp
                B[:] = coords[:, 0]
            mask = np.zeros(n, dtype=bool)
            if op not in NOT_FITTED:
                mask[np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int))] = True
            out.append(OpTable(prof.name, prof.hardware, prof.model, tp, op, kind, vals, coords, F, B, T,
                               np.full(n, nk, dtype=float), Q, S, model.num_attention_heads / tp, group, peak, hw.mem_bw_bytes_per_s,
                               hw.interconnect_bw_bytes_per_s, mask))
    return out


# ------------------------------------------------------------------------------------------------
# the model, vectorised (the same formulas as RooflineCost; tests/test_calibrate.py checks they agree)
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


def _kinds_needed(name: str) -> str:
    return PARAMS[name][2]


def fit(tables: list[OpTable], base: RooflineParams, free: list[str] | None = None) -> tuple[RooflineParams, list[str]]:
    """Least squares in log time over ``tables``; only parameters the data identify are freed."""
    from scipy.optimize import least_squares

    kinds = {t.kind for t in tables if t.fit_mask.any()}
    kinds_map = {"gemm": {"gemm", "mem"}, "mem": {"mem"}, "attn": {"attn", "attn_mixed"}, "comm": {"comm"}}
    if free is None:
        free = [n for n in NAMES if kinds & kinds_map[_kinds_needed(n)]]
        if not ({"gemm"} & kinds):
            free = [n for n in free if n not in ("eff_flops", "gemm_half_tokens")]
    if not free:
        return base, []
    # parameters that are off (0) or unset in ``base`` start from a neutral guess
    base = replace(base, **{n: v for n, v in START.items() if n in free and not getattr(base, n)})
    base = replace(base, eff_attn_mem=base.eff_attn_mem if base.eff_attn_mem is not None else base.eff_mem,
                   eff_elem=base.eff_elem if base.eff_elem is not None else base.eff_mem,
                   elem_overhead_s=base.elem_overhead_s if base.elem_overhead_s is not None else base.kernel_overhead_s,
                   attn_overhead_s=base.attn_overhead_s if base.attn_overhead_s is not None else 2 * base.kernel_overhead_s)
    tables = [t for t in tables if t.fit_mask.any()]
    weights = []
    for t in tables:
        n_same = sum(1 for u in tables if (u.hardware, u.op) == (t.hardware, t.op))
        weights.append(1.0 / math.sqrt(int(t.fit_mask.sum()) * n_same))
    logm = [np.log(t.measured[t.fit_mask]) for t in tables]
    # parameters are optimised as log(value); a zero-bounded parameter as log(value + scale)
    scale = {"gemm_half_tokens": 1.0, "kernel_overhead_s": 1e-7, "elem_overhead_s": 1e-7, "allreduce_latency_s": 1e-7, "attn_q_tile": 0.0,
             "attn_seq_overhead_s": 1e-9, "attn_overhead_s": 1e-7}

    def to_x(p):
        return np.array([math.log(getattr(p, n) + scale.get(n, 0.0)) for n in free])

    def from_x(x):
        kw = {n: float(math.exp(v) - scale.get(n, 0.0)) for n, v in zip(free, x)}
        return replace(base, **kw)

    lo = np.array([math.log(PARAMS[n][0] + scale.get(n, 0.0)) for n in free])
    hi = np.array([math.log(PARAMS[n][1] + scale.get(n, 0.0)) for n in free])

    prior = np.array([math.log(PRIOR[n] + scale.get(n, 0.0)) for n in free])

    def resid(x):
        p = from_x(x)
        parts = [w * (np.log(np.maximum(predict(t, p, sel=t.fit_mask), 1e-12)) - lm) for t, w, lm in zip(tables, weights, logm)]
        parts.append(PRIOR_WEIGHT * (x - prior))
        return np.concatenate(parts)

    x0 = np.clip(to_x(base), lo + 1e-9, hi - 1e-9)
    best = None
    for start in (x0, np.clip(x0 + 0.3, lo + 1e-9, hi - 1e-9), np.clip(x0 - 0.3, lo + 1e-9, hi - 1e-9)):
        r = least_squares(resid, start, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    return from_x(best.x), free


def _errors(tab: OpTable, p: RooflineParams, legacy: bool = False) -> np.ndarray:
    return (predict(tab, p, legacy) / tab.measured - 1.0) * 100.0


# ------------------------------------------------------------------------------------------------
# the whole calibration
def _round(p: RooflineParams) -> dict:
    out = {}
    for n in NAMES + list(SKEW.values()) + list(A_PRIORI):
        v = getattr(p, n)
        if v is None:
            continue
        out[n] = float(f"{v:.4g}")
    return out


def _yaml_num(v: float) -> str:
    """A float YAML 1.1 reads back as a float (PyYAML wants a dot in the mantissa: 1.0e-05, not 1e-05)."""
    s = repr(float(f"{v:.4g}"))
    if "e" in s and "." not in s.split("e")[0]:
        m, e = s.split("e")
        s = f"{m}.0e{e}"
    return s


def fit_all(tables: list[OpTable]) -> tuple[RooflineParams, dict[str, tuple[RooflineParams, list[str]]]]:
    """(default fitted on everything, per-hardware (params, fitted names))."""
    start = replace(RooflineParams(), eff_comm=0.8, **START, **A_PRIORI)
    default, _ = fit(tables, start)
    default = replace(default, **A_PRIORI, source="kvsim calibrate: default, fitted on all imported profiles")
    per_hw = {}
    for hw in sorted({t.hardware for t in tables}):
        mine = [t for t in tables if t.hardware == hw]
        p, free = fit(mine, default)
        per_hw[hw] = (replace(p, **A_PRIORI, source=f"kvsim calibrate: fitted on {hw} profiles"), free)
    return default, per_hw


def leave_one_out(tables: list[OpTable], bar=None) -> dict[tuple[str, str], tuple[RooflineParams, str]]:
    out = {}
    for pair in sorted({t.pair for t in tables}):
        if bar is not None:
            bar.set_postfix_str(f"without {pair[0]}/{pair[1]}")
        rest = [t for t in tables if t.pair != pair]
        default, per_hw = fit_all(rest)
        hw = pair[0]
        if hw in per_hw:
            p = replace(per_hw[hw][0], source=f"kvsim calibrate: {hw} fitted without {pair[1]}")
            how = f"{hw} fit on its other models"
        else:
            p = replace(default, source=f"kvsim calibrate: default fitted without {hw}/{pair[1]}")
            how = "default fit on other hardware (hardware unseen)"
        out[pair] = (p, how)
        if bar is not None:
            bar.update(1)
    return out


def _stats(e: np.ndarray) -> tuple[float, float, float]:
    a = np.abs(e)
    return float(np.median(a)), float(np.percentile(a, 90)), float(np.mean(e))


def load_skew(paths=None) -> dict[tuple[str, str, int], dict[str, float]]:
    """(hardware, model, TP) -> the profile's ``decode_skew_alpha`` (profiles that have one)."""
    from kvsim.cost.profile import load_profile

    paths = sorted(paths) if paths is not None else sorted(PROFILES_DIR.glob("*.json"))
    out = {}
    for path in paths:
        prof = load_profile(path)
        if prof.decode_skew_alpha:
            out[(prof.hardware, prof.model, prof.tensor_parallel_size)] = prof.decode_skew_alpha
    return out


def skew_params(skew: dict, keep) -> dict[str, float]:
    """The mean alpha per regime over the profiles ``keep((hardware, model, tp))`` selects."""
    out = {}
    for key, name in SKEW.items():
        vals = [a[key] for k, a in skew.items() if key in a and keep(k)]
        if vals:
            out[name] = float(np.mean(vals))
    return out


def apply_skew(default, per_hw, loo_params, skew: dict):
    """Skew terms for every fit: a hardware's own profiles where it has some, else all profiles
    (``default``); leave-one-out drops the withheld (hardware, model) pair's profiles."""
    d = skew_params(skew, lambda k: True)
    default = replace(default, **d)
    out_hw = {}
    for hw, (p, free) in per_hw.items():
        own = skew_params(skew, lambda k: k[0] == hw)
        out_hw[hw] = (replace(p, **{**d, **own}), free + [n for n in SKEW.values() if n in own])
    out_loo = {}
    for (hw, model), (p, how) in loo_params.items():
        rest = skew_params(skew, lambda k: (k[0], k[1]) != (hw, model))
        own = skew_params(skew, lambda k: k[0] == hw and k[1] != model)
        out_loo[(hw, model)] = (replace(p, **{**rest, **own}), how)
    return default, out_hw, out_loo


def hopper_decode_efficiency(path: Path = HOPPER_DECODE) -> dict | None:
    """Decode attention on Hopper, from kvprof's contiguous-decode timings: least squares of
    ``log t = log(a + s B + KV bytes / (W eff))`` over the GPU-bound points (a: the call's fixed time,
    s: per sequence, B sequences); None if the file is absent."""
    from scipy.optimize import least_squares

    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import ModelSpec

    if not Path(path).is_file():
        return None
    header, pts = None, []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("record") == "header":
            header = r
        elif r.get("record") == "point" and r.get("median_s"):
            pts.append(r)
    spec = header["model_spec"]
    model = ModelSpec(**{k: v for k, v in spec.items() if k in ModelSpec.__dataclass_fields__})
    tp = int(header.get("tensor_parallel_size", 1))
    from kvsim.methods.none import NoCompression

    xs, bs, ys = [], [], []
    for r in pts:
        b, kv = r["axes"]["batch_size"], r["axes"]["kv_tokens"]
        nbytes = NoCompression().decode_attention_work(model, tp, b, b * kv).bytes
        if nbytes >= HOPPER_DECODE_MIN_BYTES:
            xs.append(nbytes)
            bs.append(b)
            ys.append(r["median_s"])
    if len(xs) < 4:
        return None
    x, bsz, y = np.asarray(xs), np.asarray(bs, dtype=float), np.asarray(ys)
    bw = load_hardware("h200").mem_bw_bytes_per_s

    def resid(q):
        return np.log(q[0] * 1e-6 + q[2] * 1e-9 * bsz + x / (bw * q[1])) - np.log(y)

    fit_ = least_squares(resid, [10.0, 0.9, 100.0], bounds=([0.0, 0.05, 0.0], [1000.0, 1.0, 1e5]))
    err = np.abs(np.exp(fit_.fun) - 1.0) * 100
    return {"eff_attn_mem": float(fit_.x[1]), "attn_overhead_s": float(fit_.x[0]) * 1e-6,
            "attn_seq_overhead_s": float(fit_.x[2]) * 1e-9, "points": len(x),
            "median_abs_pct": float(np.median(err)), "p90_abs_pct": float(np.percentile(err, 90)),
            "source": str(Path(path).relative_to(PROFILES_DIR.parents[1])) if Path(path).is_relative_to(PROFILES_DIR.parents[1]) else str(path)}


def apply_hopper(per_hw: dict, loo_params: dict, hopper: dict | None):
    """h100 (its fit and its withheld fits) reads the KV cache at the efficiency measured on an H200;
    h200, with no imported profile, takes the h100 fit (``SAME_DIE``)."""
    if hopper is not None:
        kw = {n: float(f"{hopper[n]:.4g}") for n in HOPPER_PARAMS}
        kw["eff_attn_mem"] = min(HOPPER_PAGED_DECODE_EFF, hopper["eff_attn_mem"])
        for hw in ("h100",):
            if hw in per_hw:
                p, free = per_hw[hw]
                per_hw[hw] = (replace(p, **kw), [n for n in free if n not in kw] + [f"{n} (H200 kvprof)" for n in HOPPER_PARAMS]
                              + ["eff_attn_mem (H100 cases, leave-one-shape-out)"])
        for key, (p, how) in list(loo_params.items()):
            if key[0] == "h100":
                loo_params[key] = (replace(p, **kw), how)
    for hw, same in SAME_DIE.items():
        if same in per_hw and hw not in per_hw:
            p, free = per_hw[same]
            per_hw[hw] = (replace(p, source=f"kvsim calibrate: the {same} fit (same die)"), [f"(the {same} fit)"])
    return per_hw, loo_params


def run(out_dir=None, write_yaml: Path | None = None, paths=None, loo: bool = True, progress: bool = False) -> dict:
    """Fit, report, and write the calibration file: ``write_yaml``, else ``out_dir/calibration.yaml``
    (the package's own ``kvsim/cost/calibration.yaml`` only when asked for by path)."""
    tables = load_tables(paths)
    bar = None
    if progress:  # one step for the fit on everything, one per leave-one-out refit (off when not a terminal)
        import sys

        from tqdm import tqdm

        bar = tqdm(total=1 + (len({t.pair for t in tables}) if loo else 0), unit="fit", desc="calibrate",
                   file=sys.stderr, disable=None)
    default, per_hw = fit_all(tables)
    if bar is not None:
        bar.update(1)
    loo_params = leave_one_out(tables, bar) if loo else {}
    if bar is not None:
        bar.close()
    default, per_hw, loo_params = apply_skew(default, per_hw, loo_params, load_skew(paths))
    hopper = hopper_decode_efficiency() if paths is None else None
    per_hw, loo_params = apply_hopper(per_hw, loo_params, hopper)
    before = RooflineParams()
    rows = []
    for t in tables:
        after_p = per_hw[t.hardware][0]
        b, a = _stats(_errors(t, before, legacy=True)), _stats(_errors(t, after_p))
        d = _stats(_errors(t, default))
        row = {"hardware": t.hardware, "model": t.model, "tp": t.tp, "op": t.op, "points": len(t.measured),
               "before_median_abs_pct": b[0], "before_p90_abs_pct": b[1], "before_mean_pct": b[2],
               "after_median_abs_pct": a[0], "after_p90_abs_pct": a[1], "after_mean_pct": a[2],
               "default_median_abs_pct": d[0], "default_p90_abs_pct": d[1]}
        if t.pair in loo_params:
            lo = _stats(_errors(t, loo_params[t.pair][0]))
            row.update({"loo_median_abs_pct": lo[0], "loo_p90_abs_pct": lo[1], "loo_mean_pct": lo[2],
                        "loo_params": loo_params[t.pair][1]})
        rows.append(row)
    result = {"default": default, "per_hw": per_hw, "loo": loo_params, "rows": rows, "tables": tables,
              "hopper_decode": hopper}
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
        if write_yaml is None:
            write_yaml = Path(out_dir) / "calibration.yaml"
    if write_yaml is not None:
        write_calibration_yaml(result, Path(write_yaml))
        result["yaml"] = Path(write_yaml)
    return result


def write_calibration_yaml(result: dict, path: Path) -> None:
    lines = ["# Roofline efficiency terms per hardware, fitted by `kvsim calibrate` (kvsim/cost/calibrate.py) on the",
             "# real-GPU kernel timings in profiles/imported/ (least squares in log time). Regenerate with:",
             "#     kvsim calibrate --out results/calibration --yaml kvsim/cost/calibration.yaml",
             "# Not fitted (a priori, kernel timings cannot show them): layer_overhead_s, step_overhead_s.",
             "# 'fitted' lists the parameters this hardware's own data identify; the others are the default's.",
             "# leave_one_out: the same fit with one (hardware, model) pair's profiles withheld (kvsim validate",
             "# --no-profile uses these so a case is replayed with a roofline that never saw its timings).",
             "hardware:"]

    def entry(p, fitted, indent="  "):
        d = _round(p)
        s = [f"{indent}  {k}: {_yaml_num(v)}" for k, v in d.items()]
        if fitted is not None:
            s.append(f"{indent}  fitted: [{', '.join(fitted)}]")
        return s

    lines.append("  default:")
    lines += entry(result["default"], NAMES + [n for n in SKEW.values() if getattr(result["default"], n)])
    for hw, (p, free) in sorted(result["per_hw"].items()):
        lines.append(f"  {hw}:")
        lines += entry(p, free)
    if result["loo"]:
        lines.append("leave_one_out:")
        for (hw, model), (p, how) in sorted(result["loo"].items()):
            lines.append(f"  {hw}/{model}:  # {how}")
            lines += entry(p, None)
    path.write_text("\n".join(lines) + "\n")
    from kvsim.cost import roofline

    roofline._calibration_table.cache_clear()


OP_ORDER = ["qkv", "o", "mlp", "moe", "other", "lm_head", "embedding", "final_norm", "sampler", "attn_decode",
            "attn_prefill", "attn_mixed", "all_reduce"]


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per (hardware, op): errors pooled over that hardware's tables (median over tables of each stat)."""
    out = []
    keys = sorted({(r["hardware"], r["op"]) for r in rows}, key=lambda k: (k[0], OP_ORDER.index(k[1])))
    for hw, op in keys:
        sel = [r for r in rows if r["hardware"] == hw and r["op"] == op]
        agg = {"hardware": hw, "op": op, "tables": len(sel), "points": sum(r["points"] for r in sel)}
        for k in ("before_median_abs_pct", "after_median_abs_pct", "after_p90_abs_pct", "default_median_abs_pct",
                  "loo_median_abs_pct", "loo_p90_abs_pct"):
            vals = [r[k] for r in sel if k in r]
            agg[k] = float(np.median(vals)) if vals else None
        out.append(agg)
    return out


def format_markdown(result: dict) -> str:
    srows = summary_rows(result["rows"])
    lines = ["| hardware | operator | tables | points | before: median abs err % | after: median | after: p90 | "
             "leave-one-out: median | leave-one-out: p90 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    for r in srows:
        lines.append(f"| {r['hardware']} | {r['op']} | {r['tables']} | {r['points']} | {f(r['before_median_abs_pct'])} | "
                     f"{f(r['after_median_abs_pct'])} | {f(r['after_p90_abs_pct'])} | {f(r['loo_median_abs_pct'])} | "
                     f"{f(r['loo_p90_abs_pct'])} |")
    lines += ["", "Fitted parameters (efficiencies are fractions of the datasheet peaks in kvsim/specs/data/hardware.yaml):", "",
              "| hardware | " + " | ".join(NAMES) + " | fitted here |", "|---|" + "---:|" * len(NAMES) + "---|"]
    ents = [("default", result["default"], NAMES)] + [(hw, p, free) for hw, (p, free) in sorted(result["per_hw"].items())]
    for name, p, free in ents:
        cells = []
        for n in NAMES:
            v = getattr(p, n)
            cells.append(f"{v * 1e6:.1f} us" if n.endswith("_s") else f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(free) if name != 'default' else 'all'} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "operator_errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    srows = summary_rows(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(srows[0]), lineterminator="\n")
        w.writeheader()
        for r in srows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    with open(out / "params.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["entry", "param", "value", "fitted"])
        ents = [("default", result["default"], NAMES)] + [(hw, p, free) for hw, (p, free) in sorted(result["per_hw"].items())]
        ents += [(f"loo:{hw}/{m}", p, []) for (hw, m), (p, _) in sorted(result["loo"].items())]
        for name, p, free in ents:
            for n in NAMES + list(A_PRIORI):
                w.writerow([name, n, f"{getattr(p, n):.6g}", "yes" if n in free else ("a priori" if n in A_PRIORI else "no")])
    (out / "summary.md").write_text(format_markdown(result))
    plot_fit(result, out / "fit.png")
    params = {hw: p for hw, (p, _) in result["per_hw"].items()}
    write_mixed_check(mixed_attention_check(params=params), out)


def plot_fit(result: dict, path: Path) -> None:
    """Predicted against measured time, every point, per hardware (after calibration)."""
    from kvsim.metrics.plots import pyplot

    plt = pyplot()
    hws = sorted(result["per_hw"])
    fig, axes = plt.subplots(1, len(hws), figsize=(4 * len(hws), 4), squeeze=False)
    for ax, hw in zip(axes[0], hws):
        p = result["per_hw"][hw][0]
        for op in OP_ORDER:
            ts = [t for t in result["tables"] if t.hardware == hw and t.op == op]
            if not ts:
                continue
            m = np.concatenate([t.measured for t in ts])
            pr = np.concatenate([predict(t, p) for t in ts])
            ax.loglog(m * 1e6, pr * 1e6, ".", ms=2, label=op, alpha=0.6)
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k-", lw=0.6)
        ax.set_title(hw, fontsize=9)
        ax.set_xlabel("measured (us)")
        ax.set_ylabel("calibrated roofline (us)")
        ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# a check the profiles cannot hold: attention of mixed prefill + decode calls
#: LLMServingSim folder -> (kvsim hardware, model, TP) for its attention.csv files
LSS_ATTENTION = {
    "RTX4090/meta-llama/Llama-3.1-8B/bf16/tp1": ("rtx-4090", "llama-3.1-8b", 1),
    "RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp1": ("rtx-pro-6000", "llama-3.1-8b", 1),
    "RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp2": ("rtx-pro-6000", "llama-3.1-8b", 2),
    "RTXPRO6000/Qwen/Qwen3-32B/bf16/tp1": ("rtx-pro-6000", "qwen3-32b", 1),
    "RTXPRO6000/Qwen/Qwen3-32B/bf16/tp2": ("rtx-pro-6000", "qwen3-32b", 2),
    "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1": ("rtx-pro-6000", "qwen3-30b-a3b", 1),
    "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp2": ("rtx-pro-6000", "qwen3-30b-a3b", 2),
}


def shared_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "shared"


def mixed_attention_check(perf_dir: Path | None = None, params: dict | None = None) -> list[dict]:
    """LLMServingSim's attention.csv also times mixed calls (one prefill chunk plus n decodes in one
    call), which no profile table holds. Compare three predictions of each mixed row with the GPU:
    the sum of the measured pure-prefill and pure-decode times (what a per-part lookup gives), the
    measured pure prefill plus kvsim's model of decodes inside a prefill call
    (``RooflineCost.mixed_decode_attention_time_s``, no parameter fitted on mixed rows), and the
    calibrated roofline alone for both parts. Empty when the reference data is absent."""
    from kvsim.methods.none import NoCompression
    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import load_model

    perf_dir = perf_dir or shared_dir() / "reference" / "llmservingsim" / "perf"
    out = []
    for sub, (hw, model, tp) in LSS_ATTENTION.items():
        path = perf_dir / sub / "attention.csv"
        if not path.is_file():
            continue
        pp, pd, mixed = {}, {}, []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                pc, kp, nd, kd = (int(r[k]) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode"))
                t = float(r["time_us"]) * 1e-6
                if nd == 0:
                    pp[(pc, kp)] = t
                elif pc == 0:
                    pd[(nd, kd)] = t
                else:
                    mixed.append((pc, kp, nd, kd, t))
        p = (params or {}).get(hw) or None
        from kvsim.cost.roofline import calibrated_params

        roof = RooflineCost(load_model(model), load_hardware(hw), NoCompression(), tp, p or calibrated_params(hw))
        m = roof.model
        e_sum, e_kv, e_roof = [], [], []
        for pc, kp, nd, kd, t in mixed:
            if (pc, kp) not in pp or (nd, kd) not in pd:
                continue
            dec = roof.mixed_decode_attention_time_s(nd, nd * (kd + 1)) / m.num_layers
            pre = roof.prefill_attention_time_s([(pc, pc + kp, True)]) / m.num_layers
            e_sum.append((pp[(pc, kp)] + pd[(nd, kd)]) / t - 1.0)
            e_kv.append((pp[(pc, kp)] + dec) / t - 1.0)
            e_roof.append((pre + dec) / t - 1.0)
        if not e_sum:
            continue
        row = {"source": sub, "hardware": hw, "model": model, "tp": tp, "mixed_rows": len(e_sum)}
        for name, e in (("sum_of_pure_tables", e_sum), ("prefill_table_plus_kvsim_decode_in_prefill_call", e_kv),
                        ("calibrated_roofline", e_roof)):
            a = np.abs(np.asarray(e)) * 100
            row[f"{name}_median_abs_pct"] = float(np.median(a))
            row[f"{name}_p90_abs_pct"] = float(np.percentile(a, 90))
            row[f"{name}_mean_pct"] = float(np.mean(e) * 100)
        out.append(row)
    return out


def write_mixed_check(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    with open(out / "mixed_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


__all__ = ["A_PRIORI", "OpTable", "fit", "fit_all", "leave_one_out", "load_tables", "predict", "run"]
