"""Replaying a measured case and measuring kvsim's error: the run (built by :mod:`kvsim.build`, watched by
the metrics recorder and a :class:`StepLog`), the join of predicted and measured requests by
``request_id``, the error per metric and statistic, and kvsim's cost model on every measured step's shape.

The case's workload is replayed with exactly the run's engine options, each request arriving at its
*realised* time from measured.csv (the tightest replay). Percentiles are numpy's linear interpolation (as
vLLM's benchmark and the anchors use); ``request_throughput`` = completed requests / (last finish - first
arrival), the same definition for both sides.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvsim.engine.events import Observer
from kvsim.errors import ConfigError
from kvsim.validate.case import (MAX_KV_COLUMN, METRICS, Case, _parse_chunks, case_client_overhead_ms,
                                 case_requests, load_case, measured_at)
from kvsim.validate.report import format_case_md, format_table, write_case_outputs, write_errors_csv

STATS = ("mean", "p50", "p90", "p99")


def stat(values, name: str) -> float:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan
    if name == "mean":
        return float(v.mean())
    return float(np.percentile(v, float(name[1:])))


def throughput(arrivals, finishes) -> float:
    if not finishes:
        return math.nan
    span = max(finishes) - min(arrivals)
    return len(finishes) / span if span > 0 else math.nan


def err_pct(pred: float, meas: float) -> float:
    if meas is None or pred is None or math.isnan(meas) or math.isnan(pred) or meas == 0:
        return math.nan
    return (pred - meas) / meas * 100.0


class StepLog(Observer):
    """Every engine step of a run as it was committed, in order: ``(replica, start_s, duration_s,
    num_decode_seqs, decode_kv_tokens, prefill_chunks, decode_max_kv_tokens)`` (a fast-forward stretch
    gives one entry per decode step; a stretch cut short by an arrival only the steps it ran)."""

    wants_step_shapes = True

    def __init__(self):
        self.steps: list = []

    def on_step(self, ev) -> None:
        rid = ev.replica.id
        if ev.ff_steps:
            start, batch = ev.start_s, len(ev.plan.scheduled)
            for (kept, max_kept, dt), end in zip(ev.ff_shapes, ev.ff_ends):
                self.steps.append((rid, start, dt, batch, kept, [], max_kept))
                start = end
        else:
            # a lockstep group's step lasts the group's time, not the rank's own (kvsim.engine.sim)
            sh = ev.shape
            self.steps.append((rid, ev.start_s, ev.end_s - ev.start_s, sh.num_decode_seqs, sh.decode_kept_tokens,
                               list(sh.prefill_chunks), sh.decode_max_kept))


def profile_engine(prof) -> str:
    """Which serving stack's kernels a profile times: ``vllm`` (LLMServingSim's profiles are vLLM 0.19's
    own layers), ``sarathi`` (Vidur's: Sarathi-Serve's eager layers, cuBLAS and unfused norms of 2024),
    ``kvprof`` (kvprof's plain torch kernels), else ``unknown``."""
    prov = getattr(prof, "provenance", None) or {}
    src = str(prov.get("source", ""))
    if "vllm" in prov or "llmservingsim" in src:
        return "vllm"
    if "vidur" in src:
        return "sarathi"
    if "kvprof" in src:
        return "kvprof"
    return "unknown"


def resolve_spec(case: Case, use_profile: bool = True, profile=None, roofline_params: str = "withheld"):
    """The RunSpec of a case. Without a profile the roofline's params are the calibration fitted with
    this (hardware, model) withheld (``roofline_params='withheld'``) or on everything (``'calibrated'``).

    The committed profile of the case's (model, GPU, TP) is used unless it times another serving stack's
    kernels than the case's vLLM run (Vidur's Sarathi-Serve profiles): then the roofline calibrated on
    that profile's kernel timings stands in (``spec.skipped_profile`` names it). ``profile`` given
    explicitly is always used."""
    from kvsim.build import make_spec

    spec = make_spec(case.model, case.hardware, case.method, case.config,
                         profile=profile if use_profile else None, auto_profile=use_profile)
    spec.skipped_profile = None
    if (use_profile and profile is None and spec.profile is not None
            and str(case.extra.get("engine", "vllm")).lower() == "vllm" and profile_engine(spec.profile) == "sarathi"):
        spec.skipped_profile = spec.profile.name
        spec.profile = None
        roofline_params = "calibrated"
    if spec.profile is None:
        from kvsim.cost.roofline import calibrated_params

        params = None
        if roofline_params == "withheld":
            from kvsim.cost.roofline import withheld_params

            params = withheld_params(case.hardware, case.model)
        spec.roofline_params = params or calibrated_params(case.hardware)
    return spec


def simulate(case: Case, spec, arrivals: str = "measured", timeline_out=None, progress=None,
             prompt_identity: str = "infer"):
    """Replay the case; returns (summary, rows by request_id, step log)."""
    from kvsim.build import build_run
    from kvsim.engine.output_length import LengthSampler
    from kvsim.methods.base import LengthRatio
    from kvsim.metrics.collector import Recorder
    from kvsim.metrics.progress import ArrivalProgress
    from kvsim.metrics.summary import build_summary

    rec = Recorder(None, timeline_out, spec.slo, 1.0, keep_rows=True)
    log = StepLog()
    observers = [rec, log] + ([ArrivalProgress(progress)] if progress is not None else [])
    # a measured case pins every request's output length (ignore_eos): no length ratio is sampled
    lengths = LengthRatio(source="measured case: output lengths as served")
    run = build_run(spec, observers, LengthSampler(lengths, spec.config.seed))
    w0 = time.perf_counter()
    run.run(case_requests(case, arrivals, prompt_identity))
    wall = time.perf_counter() - w0
    summary = build_summary(spec, rec, run.replicas, lengths, run.sim, wall)
    rows = {r["request_id"]: r for r in rec.rows if r["status"] == "completed"}
    return summary, rows, log.steps


def step_errors(steps_csv: Path, cost) -> tuple[list[dict], dict]:
    """Cost each measured step's shape with kvsim's cost model; per-step rows and a summary."""
    from kvsim.cost.base import StepShape

    out = []
    with open(steps_csv, newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                nd = int(r["num_decode_seqs"])
                kv = int(r["decode_kv_tokens"])
                chunks = _parse_chunks(r.get("prefill_chunks", ""))
                meas = float(r["duration_ms"])
                mk = int(r.get(MAX_KV_COLUMN) or 0)
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{steps_csv}:{i}: bad step row ({e})") from None
            if nd == 0 and not chunks:
                continue
            pred = cost.step_time_s(StepShape(nd, kv, chunks, mk)) * 1e3
            out.append({"step": r.get("step", i - 1), "kind": "decode" if not chunks else ("prefill" if nd == 0 else "mixed"),
                        "num_decode_seqs": nd, "decode_kv_tokens": kv, "num_prefill_tokens": sum(c[0] for c in chunks),
                        "measured_ms": meas, "predicted_ms": pred, "error_pct": err_pct(pred, meas)})
    summ = {}
    for kind in ("all", "decode", "mixed", "prefill"):
        sel = [o for o in out if kind == "all" or o["kind"] == kind]
        if not sel:
            continue
        e = np.array([o["error_pct"] for o in sel])
        summ[kind] = {"steps": len(sel), "median_abs_error_pct": float(np.median(np.abs(e))),
                      "p90_abs_error_pct": float(np.percentile(np.abs(e), 90)),
                      "total_time_error_pct": err_pct(sum(o["predicted_ms"] for o in sel), sum(o["measured_ms"] for o in sel))}
    return out, summ


@dataclass
class CaseResult:
    case: Case
    errors: list[dict]
    summary: dict
    joined: list[dict]
    steps: list = field(default_factory=list)
    step_summary: dict | None = None
    label: str = ""
    diagnostics: dict = field(default_factory=dict)


def validate_case(case: Case, out_dir: Path | None = None, use_profile: bool = True, profile=None,
                  roofline_params: str = "withheld", arrivals: str = "measured", plot: bool = True,
                  progress=None, prompt_identity: str = "infer", client_overhead_ms=None,
                  roofline_overrides=None) -> CaseResult:
    """``client_overhead_ms``: added to every predicted TTFT and e2el; None: the case's own
    (``case_client_overhead_ms``). ``roofline_overrides``: roofline parameters replaced for this run
    (a mapping of ``RooflineParams`` fields; for fitting studies such as results/validation/h100_fit.py)."""
    spec = resolve_spec(case, use_profile, profile, roofline_params)
    if roofline_overrides:
        from kvsim.cost.roofline import calibrated_params

        base = spec.roofline_params or calibrated_params(case.hardware)
        spec.roofline_params = dataclasses.replace(base, **roofline_overrides)
    tl_buf = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tl_buf = open(out_dir / "timeline.csv", "w", newline="")
    try:
        summary, rows, steps = simulate(case, spec, arrivals, tl_buf, progress, prompt_identity)
    finally:
        if tl_buf:
            tl_buf.close()
    client_ms = case_client_overhead_ms(case) if client_overhead_ms is None else float(client_overhead_ms)
    joined = []
    for m in case.measured:
        p = rows.get(m["request_id"])
        j = {"request_id": m["request_id"], "arrival_time_s": m["arrival_time_s"], "prompt_tokens": m["prompt_tokens"],
             "output_tokens": m["output_tokens"]}
        for k in METRICS:
            j[f"measured_{k}"] = m[k]
            v = p[k] if p else None
            if v is not None and k != "tpot_ms":  # a constant on TTFT and e2el leaves their difference alone
                v += client_ms
            j[f"predicted_{k}"] = v
        j["measured_queue_ms"] = m.get("queue_ms")
        j["predicted_num_preemptions"] = p["num_preemptions"] if p else None
        j["predicted_prefix_hit_tokens"] = p["prefix_hit_tokens"] if p else None
        j["predicted_replica"] = p["replica"] if p else None
        joined.append(j)
    errors = []
    for k in METRICS:
        for s in STATS:
            pv = stat([j[f"predicted_{k}"] for j in joined], s)
            mv = stat([j[f"measured_{k}"] for j in joined], s)
            errors.append({"case": case.case_id, "metric": k, "stat": s, "predicted": pv, "measured": mv,
                           "error_pct": err_pct(pv, mv)})
    m_arr = [m["arrival_time_s"] for m in case.measured]
    m_fin = [m["arrival_time_s"] + m["e2el_ms"] / 1e3 for m in case.measured]
    p_fin = [j["arrival_time_s"] + j["predicted_e2el_ms"] / 1e3 for j in joined if j["predicted_e2el_ms"] is not None]
    pt, mt = throughput(m_arr, p_fin), throughput(m_arr, m_fin)
    errors.append({"case": case.case_id, "metric": "request_throughput", "stat": "value", "predicted": pt,
                   "measured": mt, "error_pct": err_pct(pt, mt)})
    if spec.profile is not None:
        label = "profile"
    else:
        src = (spec.roofline_params.source if spec.roofline_params is not None else "") or ""
        label = "roofline (withheld)" if " without " in src else "roofline (calibrated)"
    res = CaseResult(case, errors, summary, joined, steps, label=label)
    res.diagnostics = diagnostics(case, summary, joined, steps)
    res.diagnostics["client_overhead_ms"] = client_ms
    res.diagnostics["skipped_profile"] = getattr(spec, "skipped_profile", None)
    res.diagnostics["measured_at"] = measured_at(case)
    rep = case.prompt_repetition
    res.diagnostics["prompt_repetition"] = rep.describe() if rep is not None else None
    if case.steps_csv is not None:
        base_cost = _cost_of(spec)
        res.steps_measured, res.step_summary = step_errors(case.steps_csv, base_cost)
    if out_dir is not None:
        write_case_outputs(res, out_dir, plot)
    return res


def _cost_of(spec):
    from kvsim.build import make_cost

    return make_cost(spec)


def diagnostics(case: Case, summary: dict, joined: list[dict], steps: list) -> dict:
    """Step- and request-level figures that say where an error comes from."""
    d = {
        "cost_model": summary["cost_model"],
        "kv_blocks_per_replica": summary["kv_blocks_per_replica"],
        "peak_kv_blocks_used": summary["peak_kv_blocks_used"],
        "num_preemptions": summary["num_preemptions"],
        "prefix_cache_hit_rate": summary["prefix_cache_hit_rate"],
        "peak_batch_size": summary["peak_batch_size"],
        "mean_batch_size": summary["mean_batch_size"],
        "engine_steps": summary["sim"]["engine_steps"],
        "sim_wall_s": summary["sim"]["wall_s"],
    }
    dec = [s for s in steps if not s[5]]
    mix = [s for s in steps if s[5]]
    d["decode_steps"] = len(dec)
    d["mixed_steps"] = len(mix)
    d["mean_decode_step_ms"] = 1e3 * float(np.mean([s[2] for s in dec])) if dec else None
    d["mean_mixed_step_ms"] = 1e3 * float(np.mean([s[2] for s in mix])) if mix else None
    d["mean_decode_batch"] = float(np.mean([s[3] for s in dec])) if dec else None
    d["prefill_tokens_computed"] = int(sum(c[0] for s in mix for c in s[5]))
    d["prompt_tokens_total"] = int(sum(m["prompt_tokens"] for m in case.measured))
    q = [j["measured_queue_ms"] for j in joined if j["measured_queue_ms"] is not None and not math.isnan(j["measured_queue_ms"])]
    d["measured_queue_ms_mean"] = float(np.mean(q)) if q else None
    # decode-phase time per output token, predicted and measured (TPOT without the queue)
    return d


def validate(case_dirs, out_dir=None, use_profile: bool = True, profile=None, roofline_params: str = "withheld",
             arrivals: str = "measured", plot: bool = True, hardware: str | None = None,
             progress: bool = False, prompt_identity: str = "infer", client_overhead_ms=None) -> list[CaseResult]:
    """Replay each measured case and compare. ``hardware`` overrides the GPU of every case; ``progress``
    shows a bar per case on stderr (off when stderr is not a terminal)."""
    out = Path(out_dir) if out_dir is not None else None
    results = []
    cases = [load_case(d, hardware) for d in case_dirs]
    for i, case in enumerate(cases, 1):
        sub = out / case.case_id if out is not None else None
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(case.measured), unit="req", desc=f"validate {i}/{len(cases)} {case.case_id}",
                       file=sys.stderr, mininterval=0.5, disable=None)
        try:
            results.append(validate_case(case, sub, use_profile, profile, roofline_params, arrivals, plot, bar,
                                         prompt_identity, client_overhead_ms))
        finally:
            if bar is not None:
                bar.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_errors_csv([e for r in results for e in r.errors], out / "errors.csv")
        md = ["# kvsim validate", "", "Error = (kvsim - measured) / measured. ✗ = outside the target for mean and p50: "
              "3 %, or the anchor's published error where larger; for a case timed at an HTTP client without an "
              "anchor, TTFT 15 % and TPOT, e2el 5 %.", "", format_table(results), ""]
        md += [format_case_md(r) for r in results]
        (out / "errors.md").write_text("\n".join(md))
    return results
