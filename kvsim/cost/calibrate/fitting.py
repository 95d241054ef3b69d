"""The fit: least squares in log time per hardware (scipy ``least_squares``), each (profile, table)
weighted equally; the leave-one-out refits; the skew and Hopper terms; and :func:`run`, the whole
calibration as ``kvsim calibrate`` does it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvsim.cost.calibrate.data import HOPPER_DECODE, HOPPER_DECODE_MIN_BYTES, PROFILES_DIR, OpTable, load_skew, load_tables
from kvsim.cost.calibrate.model import A_PRIORI, NAMES, PARAMS, PRIOR, PRIOR_WEIGHT, SKEW, _errors, predict
from kvsim.cost.calibrate.report import write_calibration_yaml, write_outputs
from kvsim.cost.roofline import RooflineParams
from kvsim.resources import package_path

START = {"gemm_half_tokens": 32.0, "eff_elem": 0.5, "elem_overhead_s": 3e-6, "eff_attn_mem": 0.8, "attn_q_tile": 64.0,
         "attn_ctas": 128.0, "attn_seq_overhead_s": 1e-7, "attn_overhead_s": 8e-6}


CALIBRATION_YAML = package_path("cost", "calibration.yaml")


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
