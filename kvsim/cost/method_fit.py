"""``kvsim fit-methods``: fit the measured implementations' cost terms, and the engine baseline they sit
on, on the seed paper's LMDeploy throughput measurements (../shared/reference/seed-lmdeploy).

The data: fixed-batch prefill and decode throughput of LMDeploy 0.6 (PyTorch engine, Triton kernels) on a
48 GB Ampere card for Llama-2-7B and -13B, with an FP16 cache and four compressed ones (its README).

What is fitted, in two layers kept apart:

1. **The engine baseline** (``engines: lmdeploy-0.6``): on the FP16 rows only, six roofline parameters
   with a physical meaning: GEMM and prefill-attention efficiency, weight and KV-read bandwidth
   efficiency, and the engine's host floors (per step, per prompt token). The rest of the roofline's
   parameters are taken from kvsim's calibration at fit time and written out with them.
2. **Each measured implementation's terms**, on the ratio method / FP16 of the same model, batch and
   prompt (so the engine's absolute error cancels as far as it can): ``kivi/lmdeploy`` and
   ``gear/lmdeploy``: the int4 kernel's CUDA-core operations per KV element (decode rows);
   ``h2o/lmdeploy``: the score kernel's host time per step and its bytes per prompt token (prefill
   rows); ``streamingllm/lmdeploy``: host time per sequence of the post-prefill cut
   (prefill rows). Everything else each method does (the cut to the budget and the cache growing again
   in decode, the block copy, int4 bytes) is the method's own model, not fitted.

The committed terms are fitted on both models. Leave-one-model-out: every fit (the engine too) is
repeated on one model alone and the other model predicted; both directions are reported, per method and
stage: the median and p90 of ``|kvsim ratio / measured ratio - 1|`` and whether kvsim gets the
direction (faster or slower than FP16) right on every point whose measured ratio differs from 1 by
more than 5 %. Least squares on log ratios (log throughputs for the engine), bounded, from fixed
starting points: the fit is deterministic.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from kvsim.cost.base import StepShape
from kvsim.cost.roofline import RooflineCost, RooflineParams, calibrated_params
from kvsim.errors import ConfigError
from kvsim.methods import parse_method
from kvsim.methods.impl import SCHEMA, SCHEMA_VERSION, trial_terms
from kvsim.specs.hardware import load_hardware
from kvsim.specs.model import load_model

ENGINE = "lmdeploy-0.6"
HARDWARE = "rtx-a6000"
MODELS = {"meta-llama-Llama-2-7b-hf": "llama-2-7b", "meta-llama-Llama-2-13b-hf": "llama-2-13b"}
#: the engine's method labels -> kvsim method specs as that engine ran them (data README: H2O and
#: StreamingLLM keep 512 tokens, 64 + 448; "GEAR-4" is LMDeploy's plain int4 cache)
SEED_METHODS = {
    "None-16": "none",
    "KIVI-4": "kivi:bits=4,impl=lmdeploy",
    "GEAR-4": "gear:bits=4,impl=lmdeploy",
    "H2O-16": "h2o:budget=512,window=448,impl=lmdeploy",
    "StreamingLLM-16": "streamingllm:sink=64,window=448,impl=lmdeploy",
}
#: decode runs generate 64 tokens after the one prefill samples (data README)
DECODE_STEPS = 64

#: engine parameter -> (start, lower, upper, scale)
ENGINE_FREE = {
    "eff_flops": (0.6, 0.05, 1.0, 1.0),
    "eff_attn_flops": (0.3, 0.02, 1.0, 1.0),
    "eff_mem": (0.8, 0.05, 1.0, 1.0),
    "eff_attn_mem": (0.8, 0.05, 1.0, 1.0),
    "host_floor_step_s": (0.02, 0.0, 0.2, 1e-2),
    "host_floor_prefill_token_s": (1e-4, 0.0, 2e-3, 1e-4),
}


@dataclass(frozen=True)
class TermSpec:
    label: str          # the data's method label
    stage: str          # the rows the terms are fitted on
    terms: dict         # term -> (start, lower, upper, scale)


IMPL_TERMS = {
    "kivi/lmdeploy": TermSpec("KIVI-4", "decoding", {"dequant_ops_per_elem": (50.0, 0.0, 2000.0, 100.0)}),
    "gear/lmdeploy": TermSpec("GEAR-4", "decoding", {"dequant_ops_per_elem": (50.0, 0.0, 2000.0, 100.0)}),
    # a per-sequence host term was tried too: fitted on both models it comes out at zero
    "h2o/lmdeploy": TermSpec("H2O-16", "prefill", {
        "score_host_step_s": (3e-4, 0.0, 0.02, 1e-3),
        "score_bytes_per_token": (1e5, 0.0, 1e8, 1e5)}),
    "streamingllm/lmdeploy": TermSpec("StreamingLLM-16", "prefill", {"cut_host_seq_s": (1e-5, 0.0, 0.01, 1e-4)}),
}


@dataclass(frozen=True)
class Point:
    model: str
    label: str
    stage: str
    batch_size: int
    prompt_len: int
    tokens_per_s: float


def default_data_path() -> Path:
    from kvsim.resources import shared_dir

    return shared_dir() / "reference" / "seed-lmdeploy" / "throughput.csv"


def load_points(path) -> list[Point]:
    """The Llama-2-7B and -13B rows of the seed data; other models are refused (kept back as a check)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (the seed paper's LMDeploy measurements, "
                          "../shared/reference/seed-lmdeploy/throughput.csv)")
    out = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            model = MODELS.get(row.get("model", ""))
            if model is None or row.get("method") not in SEED_METHODS:
                continue
            try:
                out.append(Point(model, row["method"], row["stage"], int(row["bsz"]), int(row["prompt_len"]),
                                 float(row["tokens_per_s"])))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path}:{i}: {e}") from None
    if not out:
        raise ConfigError(f"{path}: no Llama-2-7B/13B rows with a known method")
    return out


# -- kvsim's prediction of one point -------------------------------------------------------------


def fixed_batch_throughput(cost, method, batch_size: int, prompt_len: int, stage: str,
                           decode_steps: int = DECODE_STEPS) -> float:
    """Throughput as the data defines it: prefill B x L / (one step prefilling B whole prompts);
    decode B / mean step time over ``decode_steps`` steps from a KV of ``prompt_len`` (min and max
    dropped, as the source script does)."""
    if stage == "prefill":
        t = cost.step_time_s(StepShape(0, 0, [(prompt_len, prompt_len, True)] * batch_size))
        return batch_size * prompt_len / t
    times = sorted(cost.decode_step_time_s(batch_size, batch_size * method.kept_tokens(prompt_len, prompt_len + i))
                   for i in range(1, decode_steps + 1))
    if len(times) > 2:
        times = times[1:-1]
    return batch_size / statistics.fmean(times)


class Predictor:
    """kvsim's throughput at a data point for given engine parameters (and, inside ``trial_terms``,
    given implementation terms). Cost models are cached per (model, method, params)."""

    def __init__(self, params: RooflineParams):
        self.params = params
        self.hw = load_hardware(HARDWARE)
        self._cost: dict = {}

    def cost(self, model: str, spec: str):
        key = (model, spec)
        if key not in self._cost:
            self._cost[key] = RooflineCost(load_model(model), self.hw, parse_method(spec), 1, self.params)
        return self._cost[key]

    def throughput(self, p: Point, spec: str | None = None) -> float:
        spec = spec or SEED_METHODS[p.label]
        cost = self.cost(p.model, spec)
        return fixed_batch_throughput(cost, cost.method, p.batch_size, p.prompt_len, p.stage)


def base_params() -> RooflineParams:
    """Everything the engine fit does not free, from kvsim's calibration for this GPU at fit time."""
    return replace(calibrated_params(HARDWARE), source=f"engine {ENGINE}")


def _least_squares(resid, free: dict, starts: dict | None = None):
    """Bounded least squares in scaled units; ``starts`` (param -> start values) tries each start and
    keeps the lowest cost (a max() in the model makes the problem piecewise smooth: a floor that starts
    below the GPU time has no gradient). Deterministic."""
    from scipy.optimize import least_squares

    names = list(free)
    lo = np.array([free[n][1] / free[n][3] for n in names])
    hi = np.array([free[n][2] / free[n][3] for n in names])
    best = None
    variants = [{}] + [{k: v} for k, vs in (starts or {}).items() for v in vs]
    for variant in variants:
        x0 = np.array([variant.get(n, free[n][0]) / free[n][3] for n in names])
        res = least_squares(lambda x: resid({n: float(v) * free[n][3] for n, v in zip(names, x)}), x0,
                            bounds=(lo, hi), method="trf", x_scale=1.0, diff_step=1e-4, max_nfev=400)
        if best is None or res.cost < best.cost - 1e-12:
            best = res
    return {n: float(v) * free[n][3] for n, v in zip(names, best.x)}


#: starting points of the engine's step floor tried (seconds): whether it binds changes the gradient
FLOOR_STARTS = {"host_floor_step_s": (0.005, 0.035, 0.05)}


def fit_engine(points: list[Point], models: list[str]) -> RooflineParams:
    fp16 = [p for p in points if p.label == "None-16" and p.model in models]
    base = base_params()

    def resid(vals):
        pred = Predictor(replace(base, **vals))
        return np.array([math.log(pred.throughput(p) / p.tokens_per_s) for p in fp16])

    return replace(base, **_least_squares(resid, ENGINE_FREE, FLOOR_STARTS))


def ratio_points(points: list[Point], label: str, models: list[str], stage: str | None = None):
    """(point, fp16 point, measured ratio) for every row of ``label`` whose FP16 twin exists."""
    fp16 = {(p.model, p.stage, p.batch_size, p.prompt_len): p for p in points if p.label == "None-16"}
    out = []
    for p in points:
        if p.label != label or p.model not in models or (stage and p.stage != stage):
            continue
        twin = fp16.get((p.model, p.stage, p.batch_size, p.prompt_len))
        if twin is not None:
            out.append((p, twin, p.tokens_per_s / twin.tokens_per_s))
    return out


def fit_terms(points: list[Point], key: str, params: RooflineParams, models: list[str]) -> dict[str, float]:
    spec = IMPL_TERMS[key]
    rows = ratio_points(points, spec.label, models, spec.stage)
    pred = Predictor(params)
    base = {id(tw): pred.throughput(tw) for _, tw, _ in rows}

    def resid(vals):
        with trial_terms({key: vals}):
            pred._cost = {k: v for k, v in pred._cost.items() if k[1] == "none"}
            return np.array([math.log(pred.throughput(p) / base[id(tw)] / r) for p, tw, r in rows])

    return _least_squares(resid, spec.terms)


# -- the whole fit ----------------------------------------------------------------------------------


def fit_fold(points: list[Point], models: list[str], params: RooflineParams | None = None
             ) -> tuple[RooflineParams, dict[str, dict[str, float]]]:
    """Method terms fitted on ``models``; the engine too unless ``params`` is given."""
    params = params or fit_engine(points, models)
    terms = {key: fit_terms(points, key, params, models) for key in IMPL_TERMS
             if ratio_points(points, IMPL_TERMS[key].label, models, IMPL_TERMS[key].stage)}
    return params, terms


def predict_rows(points: list[Point], params: RooflineParams, terms: dict, models: list[str]) -> list[dict]:
    """kvsim's throughput and ratio at every point of ``models`` under these params and terms."""
    pred = Predictor(params)
    out = []
    with trial_terms(terms):
        fp16 = {(p.model, p.stage, p.batch_size, p.prompt_len): p for p in points if p.label == "None-16"}
        missing = {spec.label for key, spec in IMPL_TERMS.items() if key not in terms}
        for p in points:
            if p.model not in models or p.label in missing:  # no fit for it in this fold (KIVI-4: 7B rows only)
                continue
            t = pred.throughput(p)
            row = {"model": p.model, "method": p.label, "spec": SEED_METHODS[p.label], "stage": p.stage,
                   "batch_size": p.batch_size, "prompt_len": p.prompt_len, "measured_tokens_per_s": p.tokens_per_s,
                   "kvsim_tokens_per_s": t, "measured_ratio": None, "kvsim_ratio": None}
            twin = fp16.get((p.model, p.stage, p.batch_size, p.prompt_len))
            if p.label != "None-16" and twin is not None:
                row["measured_ratio"] = p.tokens_per_s / twin.tokens_per_s
                row["kvsim_ratio"] = t / pred.throughput(twin)
            out.append(row)
    return out


def error_stats(rows: list[dict], key: str = "ratio") -> dict:
    """Median and p90 of |kvsim / measured - 1| in %, and direction misses (measured off 1 by > 5 %)."""
    if key == "ratio":
        pairs = [(r["kvsim_ratio"], r["measured_ratio"]) for r in rows if r["measured_ratio"] is not None]
    else:
        pairs = [(r["kvsim_tokens_per_s"], r["measured_tokens_per_s"]) for r in rows]
    if not pairs:
        return {}
    e = np.abs(np.array([a / b - 1.0 for a, b in pairs])) * 100
    out = {"n": len(pairs), "median_pct": round(float(np.median(e)), 2), "p90_pct": round(float(np.percentile(e, 90)), 2)}
    if key == "ratio":
        clear = [(a, b) for a, b in pairs if abs(b - 1.0) > 0.05]
        out["direction_points"] = len(clear)
        out["direction_wrong"] = sum(1 for a, b in clear if (a - 1.0) * (b - 1.0) <= 0)
    return out


def _groups(rows):
    keys = sorted({(r["method"], r["stage"]) for r in rows})
    return [(m, s, [r for r in rows if r["method"] == m and r["stage"] == s]) for m, s in keys]


def run(data=None, progress: bool = True) -> dict:
    points = load_points(data or default_data_path())
    all_models = sorted({p.model for p in points})
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"fit-methods: {len(points)} points; fitting on {', '.join(all_models)}")
    params, terms = fit_fold(points, all_models)
    rows = predict_rows(points, params, terms, all_models)
    folds = {}
    loo_rows, strict_rows = [], []
    for test in all_models:
        train = [m for m in all_models if m != test]
        if not train:
            continue
        say(f"fit-methods: leave-one-model-out, method terms fitted on {', '.join(train)}, predict {test}")
        # the method terms withheld; the engine baseline is the FP16 calibration of both models
        _, t_f = fit_fold(points, train, params)
        r_test = predict_rows(points, params, t_f, [test])
        for r in r_test:
            r["fit_on"] = "+".join(train)
        loo_rows += r_test
        # strict: the engine's FP16 calibration withheld too
        p_s, t_s = fit_fold(points, train)
        r_strict = predict_rows(points, p_s, t_s, [test])
        for r in r_strict:
            r["fit_on"] = "+".join(train) + " (engine too)"
        strict_rows += r_strict
        folds[test] = {"fit_on": train, "terms": t_f, "strict_engine": _engine_dict(p_s), "strict_terms": t_s}
    return {"points": points, "params": params, "terms": terms, "rows": rows, "folds": folds,
            "loo_rows": loo_rows, "strict_rows": strict_rows}


def _engine_dict(p: RooflineParams) -> dict:
    return {f.name: getattr(p, f.name) for f in fields(RooflineParams) if f.name != "source"}


def _sig(x: float, n: int = 4):
    return float(f"{x:.{n}g}") if isinstance(x, float) else x


def terms_document(result: dict, data_path: str) -> dict:
    """The committed file's content (``kvsim/methods/data/method_terms.yaml``)."""
    rows, loo, strict = result["rows"], result["loo_rows"], result["strict_rows"]
    impls = {}
    for key, spec in IMPL_TERMS.items():
        if key not in result["terms"]:
            continue
        sel = [r for r in rows if r["method"] == spec.label]
        models = sorted({r["model"] for r in sel})
        entry = {
            "terms": {k: _sig(v) for k, v in result["terms"][key].items()},
            "fitted_on": f"{spec.label} {spec.stage} rows of {', '.join(models)} (ratio to FP16)",
            "spec": SEED_METHODS[spec.label],
            "fit_error_pct": {f"{s}": error_stats(g) for _, s, g in _groups(sel)},
            "leave_one_model_out": {},
        }
        for test, fold in result["folds"].items():
            if key in fold["terms"]:
                g = [r for r in loo if r["method"] == spec.label and r["model"] == test]
                gs = [r for r in strict if r["method"] == spec.label and r["model"] == test]
                entry["leave_one_model_out"][f"fit {'+'.join(fold['fit_on'])}, predict {test}"] = {
                    "terms": {k: _sig(v) for k, v in fold["terms"][key].items()},
                    "error_pct": {s: error_stats(gg) for _, s, gg in _groups(g)},
                    "error_pct_engine_withheld_too": {s: error_stats(gg) for _, s, gg in _groups(gs)}}
        impls[key] = entry
    fp16 = [r for r in rows if r["method"] == "None-16"]
    engine = {
        "hardware": HARDWARE,
        "description": ("LMDeploy 0.6 PyTorch engine (Triton kernels, eager, block size 64) on the 48 GB Ampere card "
                        "of the seed paper's runs (probably an RTX A6000)"),
        "fitted_on": f"None-16 rows of {', '.join(sorted({r['model'] for r in fp16}))} (absolute throughput)",
        "fitted": list(ENGINE_FREE),
        "params": {k: _sig(v) for k, v in _engine_dict(result["params"]).items()},
        "fit_error_pct": {f"{m} {s}": error_stats([r for r in g if r["model"] == m], key="tput")
                          for _, s, g in _groups(fp16) for m in sorted({r["model"] for r in g})},
        "leave_one_model_out": {
            f"fit {'+'.join(f['fit_on'])}, predict {test}": {
                "params": {k: _sig(f["strict_engine"][k]) for k in ENGINE_FREE},
                "error_pct": {s: error_stats([r for r in strict if r["model"] == test and r["method"] == "None-16"
                                              and r["stage"] == s], key="tput") for s in ("prefill", "decoding")}}
            for test, f in result["folds"].items()},
    }
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "data": f"{data_path} (Gao et al., MLSys 2025 artifact; Llama-2-7B and Llama-2-13B rows only)",
            "command": "kvsim fit-methods", "engines": {ENGINE: engine}, "implementations": impls}


def _fmt(e: dict, k: str) -> str:
    return f"{e[k]:.1f}" if e and k in e else "n/a"


def error_table_md(result: dict) -> str:
    """Per method, stage and model: method / FP16 ratio errors with the model withheld from the method
    terms' fit (the engine's FP16 calibration on both models), with the engine withheld too, and the
    fit on both models; then the FP16 baseline's absolute error."""
    lines = ["| method | stage | predicted model | n | withheld: median % | p90 % | direction wrong / clear "
             "| engine withheld too: median % | p90 % | fit on both: median % | p90 % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    loo = {(m, s): g for m, s, g in _groups(result["loo_rows"])}
    strict = {(m, s): g for m, s, g in _groups(result["strict_rows"])}
    for m, s, g in _groups(result["rows"]):
        if m == "None-16":
            continue
        for model in sorted({r["model"] for r in g}):
            f = error_stats([r for r in g if r["model"] == model])
            e = error_stats([r for r in loo.get((m, s), []) if r["model"] == model])
            es = error_stats([r for r in strict.get((m, s), []) if r["model"] == model])
            wrong = f"{e['direction_wrong']} / {e['direction_points']}" if e else "n/a (no other model measured)"
            lines.append(f"| {m} | {s} | {model} | {f['n']} | {_fmt(e, 'median_pct')} | {_fmt(e, 'p90_pct')} | {wrong} "
                         f"| {_fmt(es, 'median_pct')} | {_fmt(es, 'p90_pct')} | {f['median_pct']:.1f} | {f['p90_pct']:.1f} |")
    lines += ["", "FP16 baseline (absolute throughput, engine lmdeploy-0.6):", "",
              "| model | stage | fit on both: median % | p90 % | withheld: median % | p90 % |", "|---|---|---|---|---|---|"]
    for m, s, g in _groups(result["rows"]):
        if m != "None-16":
            continue
        for model in sorted({r["model"] for r in g}):
            f = error_stats([r for r in g if r["model"] == model], key="tput")
            lo = error_stats([r for r in result["strict_rows"] if r["method"] == m and r["stage"] == s
                              and r["model"] == model], key="tput")
            lines.append(f"| {model} | {s} | {f['median_pct']:.1f} | {f['p90_pct']:.1f} | "
                         f"{lo.get('median_pct', float('nan')):.1f} | {lo.get('p90_pct', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path, data_path: str, plot: bool = True) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    doc = terms_document(result, data_path)
    header = ("# Written by `kvsim fit-methods` (kvsim/cost/method_fit.py); do not edit by hand.\n"
              "# Measured implementation terms and the engine baseline they were fitted beside.\n")
    (out / "method_terms.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False, width=110))
    cols = ["model", "method", "spec", "stage", "batch_size", "prompt_len", "measured_tokens_per_s",
            "kvsim_tokens_per_s", "measured_ratio", "kvsim_ratio", "fit_on"]
    with open(out / "errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, "fit_on": "both"})
        for r in result["loo_rows"] + result["strict_rows"]:
            w.writerow(r)
    (out / "errors.md").write_text(error_table_md(result))
    if plot:
        method_ratio_plots(result, out)


def method_ratio_plots(result: dict, out: Path) -> list[Path]:
    """Measured vs kvsim method / FP16 throughput ratios (kvsim.cost.method_fit), one figure per model:
    a row per method, columns prefill and decode against prompt length (batch 1) and against batch size
    (prompt 1024). Measured: points; kvsim fitted on the other model only: solid line; on both: dashed."""
    from kvsim.metrics.plots import pyplot

    plt = pyplot()
    rows = result["rows"]
    methods = [m for m in SEED_METHODS if m != "None-16" and any(r["method"] == m for r in rows)]
    panels = [("prefill", "prompt_len", 1), ("prefill", "batch_size", 1024),
              ("decoding", "prompt_len", 1), ("decoding", "batch_size", 1024)]
    written = []
    for model in sorted({r["model"] for r in rows}):
        fold = result["folds"].get(model)
        fig, axes = plt.subplots(len(methods), 4, figsize=(15, 2.6 * len(methods)), squeeze=False)
        for i, meth in enumerate(methods):
            key = next(k for k, spec in IMPL_TERMS.items() if spec.label == meth)
            fits = [("fit on both models", "--", result["params"], result["terms"])]
            if fold and key in fold["terms"]:
                fits.insert(0, (f"method terms fitted on {'+'.join(fold['fit_on'])} only", "-", result["params"],
                                {**result["terms"], key: fold["terms"][key]}))
            for j, (stage, axis, fixed) in enumerate(panels):
                ax = axes[i][j]
                other = "batch_size" if axis == "prompt_len" else "prompt_len"
                pts = sorted((r[axis], r["measured_ratio"]) for r in rows
                             if r["model"] == model and r["method"] == meth and r["stage"] == stage
                             and r["measured_ratio"] is not None
                             and (r[other] == fixed or (other == "prompt_len" and stage == "decoding"
                                                        and fixed - 64 <= r[other] <= fixed + 65)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="black", ms=4, label="measured")
                xs = ([128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096] if axis == "prompt_len"
                      else [1, 2, 3, 4, 6, 8, 12, 16])
                for label, style, params, terms in fits:
                    pred = Predictor(params)
                    ys = []
                    with trial_terms(terms):
                        for x in xs:
                            b, p = (fixed, x) if axis == "prompt_len" else (x, fixed)
                            pt = Point(model, meth, stage, b, p, 0.0)
                            ys.append(pred.throughput(pt) / pred.throughput(replace(pt, label="None-16")))
                    ax.plot(xs, ys, style, color="tab:blue", lw=1.2, label=f"kvsim, {label}")
                ax.axhline(1.0, color="grey", lw=0.6)
                ax.set_xscale("log", base=2)
                # at least 0.85-1.15 shown, so a 1 % wiggle does not look like a trend
                lo, hi = ax.get_ylim()
                ax.set_ylim(min(lo, 0.85), max(hi, 1.15))
                ax.set_title(f"{meth} {stage} vs {axis.replace('_', ' ')}"
                             f" ({'batch 1' if axis == 'prompt_len' else 'prompt 1024'})"
                             + ("" if pts else ": not measured"), fontsize=8)
                ax.tick_params(labelsize=7)
                if j == 0:
                    ax.legend(fontsize=6)
                if j == 0:
                    ax.set_ylabel("method / FP16 throughput", fontsize=7)
        fig.suptitle(f"{model}: LMDeploy 0.6, 48 GB Ampere card (seed paper data) vs kvsim", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"ratios_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["run", "load_points", "fit_fold", "predict_rows", "error_stats", "fixed_batch_throughput",
           "SEED_METHODS", "IMPL_TERMS", "ENGINE"]
