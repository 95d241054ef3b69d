"""The data ``kvsim calibrate`` fits on: one :class:`OpTable` per (profile, table), with the roofline's
counts per point (FLOPs, bytes, kernels) beside the measured times; the imported profiles, kvprof's H200
GEMMs and decode timings, LLMServingSim's mixed-attention and skew tables."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvsim.cost.calibrate.model import PRIOR
from kvsim.cost.roofline import KERNELS, RooflineCost, RooflineParams
from kvsim.resources import profiles_dir, shared_dir

#: profile table -> operator name in reports
TABLE_OPS = {"linear.qkv": "qkv", "linear.o": "o", "linear.mlp": "mlp", "linear.moe": "moe",
             "linear.other": "other", "linear.lm_head": "lm_head", "step.embedding": "embedding",
             "step.final_norm": "final_norm", "step.sampler": "sampler", "attention.decode.none": "attn_decode",
             "attention.prefill.flash": "attn_prefill", "comm.all_reduce": "all_reduce"}


#: reported but not fitted: the profilers feed one repeated dummy token id, so the embedding gather
#: reads one cached row (LLMServingSim's times imply more than the GPU's DRAM bandwidth)
NOT_FITTED = {"embedding"}
MAX_POINTS = 400  # per table in the fit (evenly thinned); errors are reported on every point


PROFILES_DIR = profiles_dir() / "imported"


#: decode attention over a contiguous KV cache on an H200, timed by kvprof (docs/kvprof-kernels.md,
#: ``--contiguous-decode``): the traffic of an ideal paged kernel. Hopper has no attention table in the
#: imported profiles, so this sets h100's and h200's KV-read efficiency (a fraction of each chip's own peak:
#: same GH100 SMs and memory system, HBM3 vs HBM3e) instead of the default fitted on A40 and RTX GPUs
HOPPER_DECODE = PROFILES_DIR.parent / "kvprof" / "raw" / "h200__llama-2-7b__tp1__contiguous-decode.jsonl"


#: its points with at least this much KV per call: GPU-bound (125 us and more), clear of the eager
#: launch floor (~50 us) that the smaller points sit on
HOPPER_DECODE_MIN_BYTES = 512e6


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
