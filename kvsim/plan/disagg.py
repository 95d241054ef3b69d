"""Capacity planning across the prefill/decode split: per method, the fewest GPUs ``n_p x tp_p + n_d x tp_d``
of a disaggregated cluster that serve a trace within an SLO (``kvsim plan --disagg``), beside the fewest of
co-located serving (``kvsim.plan.planner``) for the same trace, SLO and rate.

Search, per method and per pair of tensor-parallel degrees (``tp_p``, ``tp_d``): for ``n_p = 1, 2, ...`` the
fewest decode instances ``n_d`` that make the run feasible, by exponential search then bisection on ``n_d``
(feasibility assumed monotone in ``n_d``, as the co-located planner assumes it in the replica count). More
prefill instances never need more decode instances (in expectation), so each ``n_p`` searches ``n_d`` only up
to the previous answer; the loop stops once ``n_p x tp_p + tp_d`` (one decode instance) cannot beat the best
cluster found, or at ``max_instances``. A configuration is feasible exactly as in ``kvsim plan``: every SLO
term met and no request rejected.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from kvsim.errors import KvsimError
from kvsim.plan.planner import Planner, check_slo, goodput_slo


@dataclass
class PDEvaluation:
    method: str
    prefill_tensor_parallel_size: int
    num_prefill_instances: int
    decode_tensor_parallel_size: int
    num_decode_instances: int
    rate_scale: float
    feasible: bool
    margin_pct: float | None = None
    worst_term: str | None = None
    values: dict = field(default_factory=dict)
    reason: str = ""
    completed: int = 0
    rejected: int = 0
    duration_s: float = 0.0
    error: str | None = None
    wall_s: float = 0.0
    #: bytes moved prefill -> decode per request, and the send links' mean busy fraction
    kv_transfer_bytes_per_request: float | None = None
    pd_send_utilization: float | None = None

    @property
    def gpus(self) -> int:
        return (self.num_prefill_instances * self.prefill_tensor_parallel_size
                + self.num_decode_instances * self.decode_tensor_parallel_size)

    @property
    def shape(self) -> str:
        return (f"{self.num_prefill_instances}xTP{self.prefill_tensor_parallel_size} + "
                f"{self.num_decode_instances}xTP{self.decode_tensor_parallel_size}")

    def as_row(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("values")
        d.update(self.values)
        d["gpus"] = self.gpus
        d["shape"] = self.shape
        return d


class PDPlanner(Planner):
    """A Planner (same trace handling, SLO, cache) whose points are disaggregated clusters. ``transfer``: the
    link and mode options (kvsim.transfer.TransferConfig fields) every point shares."""

    def __init__(self, trace, slo, transfer: dict | None = None, **kw):
        super().__init__(trace, slo, **kw)
        self.transfer = dict(transfer or {})
        self.pd_log: list[PDEvaluation] = []
        self._pd_cache: dict = {}

    def evaluate_pd(self, method, tp_p: int, n_p: int, tp_d: int, n_d: int, rate_scale: float | None = None) -> PDEvaluation:
        from kvsim.build import make_spec
        from kvsim.methods import parse_method
        from kvsim.replay import replay

        meth = parse_method(method).spec_string()
        rs = float(rate_scale if rate_scale is not None else self.rate_scale)
        key = (meth, tp_p, n_p, tp_d, n_d, rs)
        if key in self._pd_cache:
            return self._pd_cache[key]
        t0 = time.perf_counter()
        ev = PDEvaluation(meth, tp_p, n_p, tp_d, n_d, rs, False)
        tr = dict(self.transfer, num_prefill_instances=n_p, num_decode_instances=n_d,
                  prefill_tensor_parallel_size=tp_p, decode_tensor_parallel_size=tp_d)
        cfg = dataclasses.replace(self.config, num_replicas=1)
        try:
            spec = make_spec(self.model, self.hardware, meth, cfg, self.profile, goodput_slo(self.terms),
                             auto_profile=self.auto_profile, transfer=tr)
            res = replay(self._stream(rs), spec=spec, fmt=self.fmt, skip_invalid=self.skip_invalid,
                             keep_rows=False, plot=False, progress=False, rate_scale=rs, limit=self.limit)
        except KvsimError as e:
            ev.error, ev.reason = str(e), "error"
        else:
            s = res.summary
            chk = check_slo(s, self.terms)
            ev.feasible = chk["feasible"]
            ev.margin_pct, ev.worst_term = chk["margin_pct"], chk["worst_term"]
            ev.values, ev.reason = chk["values"], chk["reason"]
            ev.completed, ev.rejected, ev.duration_s = s["completed"], s["rejected"], s["duration_s"]
            t = s.get("kv_transfer") or {}
            ev.kv_transfer_bytes_per_request = t.get("bytes_per_request_mean")
            ev.pd_send_utilization = (t.get("link_utilization") or {}).get("pd_send")
        ev.wall_s = time.perf_counter() - t0
        self._pd_cache[key] = ev
        self.pd_log.append(ev)
        if self.progress is not None:
            self.progress.set_postfix_str(f"{meth} {ev.shape}", refresh=False)
            self.progress.update(1)
        return ev

    def _min_decode(self, meth, tp_p, n_p, tp_d, hi_cap: int):
        """Fewest decode instances (<= hi_cap) with n_p prefill instances: (n_d or None, the evaluation)."""
        lo, hi, n = 0, None, 1
        ev = None
        while True:
            ev = self.evaluate_pd(meth, tp_p, n_p, tp_d, n)
            if ev.error is not None:
                return None, ev
            if ev.feasible:
                hi = n
                break
            lo = n
            if n >= hi_cap:
                return None, ev
            n = min(2 * n, hi_cap)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.evaluate_pd(meth, tp_p, n_p, tp_d, mid).feasible:
                hi = mid
            else:
                lo = mid
        return hi, self.evaluate_pd(meth, tp_p, n_p, tp_d, hi)

    def min_gpus_pd(self, method, tp_p: int = 1, tp_d: int = 1, max_instances: int = 16) -> dict:
        """The cheapest feasible cluster for one (method, tp_p, tp_d): a plan row."""
        from kvsim.methods import parse_method

        meth = parse_method(method).spec_string()
        n0 = len(self.pd_log)
        best: PDEvaluation | None = None
        last = None
        cap = max_instances
        for n_p in range(1, max_instances + 1):
            if best is not None and n_p * tp_p + tp_d >= best.gpus:
                break
            n_d, ev = self._min_decode(meth, tp_p, n_p, tp_d, cap)
            last = ev
            if ev.error is not None:
                return _pd_row(meth, tp_p, tp_d, "error", None, len(self.pd_log) - n0, ev.error, self)
            if n_d is None:
                continue
            cap = n_d  # more prefill instances never need more decode instances
            if best is None or ev.gpus < best.gpus or (ev.gpus == best.gpus and (ev.margin_pct or 0) > (best.margin_pct or 0)):
                best = ev
        if best is None:
            why = last.reason if last is not None else ""
            return _pd_row(meth, tp_p, tp_d, "infeasible", last, len(self.pd_log) - n0,
                           f"SLO not met with up to {max_instances} instances a side ({why})", self)
        return _pd_row(meth, tp_p, tp_d, "ok", best, len(self.pd_log) - n0, "", self)


def _pd_row(meth, tp_p, tp_d, status, ev, replays, note, planner) -> dict:
    row = {"method": meth, "status": status, "prefill_tensor_parallel_size": tp_p, "decode_tensor_parallel_size": tp_d,
           "num_replays": replays, "note": note, "rate_scale": planner.rate_scale,
           "request_rate": planner.request_rate()}
    if ev is not None:
        row.update(ev.as_row())
        row["status"], row["note"] = status, note
        if status == "ok":
            row["gpu_hours_per_million"] = planner.gpu_hours_per_million(ev.gpus, ev.completed,
                                                                         fallback_duration_s=ev.duration_s)
        else:
            for k in ("gpus", "shape", "num_prefill_instances", "num_decode_instances"):
                row.pop(k, None)
    return row


PD_COLUMNS = ["method", "status", "shape", "num_prefill_instances", "prefill_tensor_parallel_size", "num_decode_instances",
              "decode_tensor_parallel_size", "gpus", "gpu_hours_per_million", "margin_pct", "worst_term",
              "kv_transfer_bytes_per_request", "pd_send_utilization", "num_replays", "note"]


@dataclass
class PDPlanResult:
    rows: list[dict]          # per method: the cheapest cluster over the TP pairs tried
    candidates: list[dict]    # per (method, tp_p, tp_d)
    colocated: list[dict]     # per method: kvsim plan's co-located answer (same trace, SLO, rate)
    evaluations: list[PDEvaluation]
    terms: tuple

    def df(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def format(self) -> str:
        return format_pd_plan(self.rows, self.colocated, self.terms)


def _best(rows):
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return dict(rows[0], note="; ".join(f"TP {r['prefill_tensor_parallel_size']}/{r['decode_tensor_parallel_size']}: "
                                            f"{r['note'] or r['status']}" for r in rows))
    return min(ok, key=lambda r: (r["gpus"], -(r["margin_pct"] or 0.0), r["prefill_tensor_parallel_size"],
                                  r["decode_tensor_parallel_size"]))


def plan_disagg(trace, slo, methods=("none",), model="llama-3.1-8b", hardware="h100", prefill_tps=(1,), decode_tps=(1,),
                config=None, transfer: dict | None = None, rate_scale: float = 1.0, limit: int | None = None,
                max_instances: int = 16, colocated: bool = True, colocated_tps=None, profile=None,
                auto_profile: bool = True, fmt=None, skip_invalid: bool = False, out_dir=None,
                progress: bool = False) -> PDPlanResult:
    """Per method, the fewest GPUs of a disaggregated cluster meeting ``slo`` (and, with ``colocated``, the
    fewest of co-located serving over ``colocated_tps``, default the union of both sides' degrees)."""
    import sys

    from kvsim.methods import parse_method, parse_method_list
    from kvsim.plan.planner import plan_capacity

    specs = ([m.spec_string() for m in parse_method_list(methods)] if isinstance(methods, str)
             else [parse_method(m).spec_string() for m in methods])
    planner = PDPlanner(trace, slo, transfer, model=model, hardware=hardware, config=config, profile=profile,
                        auto_profile=auto_profile, fmt=fmt, skip_invalid=skip_invalid, limit=limit, rate_scale=rate_scale)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="replay", desc="plan --disagg", file=sys.stderr, mininterval=0.5, disable=None)
        planner.progress = bar
    cands = [planner.min_gpus_pd(m, int(a), int(b), max_instances) for m in specs
             for a in sorted(set(prefill_tps)) for b in sorted(set(decode_tps))]
    rows = [_best([c for c in cands if c["method"] == m]) for m in specs]
    planner.progress = None
    col = []
    if colocated:
        tps = sorted(set(colocated_tps or (*prefill_tps, *decode_tps)))
        pc = plan_capacity(trace, slo, specs, model, hardware, tps, config, rate_scale, limit, 2 * max_instances,
                           profile=profile, auto_profile=auto_profile, fmt=fmt, skip_invalid=skip_invalid,
                           progress=False, transfer={k: v for k, v in (transfer or {}).items()
                                                     if k.startswith("kv_offload")} or None)
        col = pc.rows
        by = {r["method"]: r for r in col}
        for r in rows:
            c = by.get(r["method"]) or {}
            r["colocated_gpus"] = c.get("gpus")
            r["colocated_shape"] = (f"{c['num_replicas']}xTP{c['tensor_parallel_size']}"
                                    if c.get("status") == "ok" else None)
    if bar is not None:
        bar.close()
    result = PDPlanResult(rows, cands, col, list(planner.pd_log), planner.terms)
    if out_dir is not None:
        write_pd_plan(result, out_dir)
    return result


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_pd_plan(rows, colocated=(), terms=()) -> str:
    cols = ["method", "status", "shape", "gpus", "gpu_hours_per_million", "margin_pct", "worst_term",
            *[t.key for t in terms], "kv_transfer_bytes_per_request", "pd_send_utilization"]
    if any("colocated_gpus" in r for r in rows):
        cols += ["colocated_shape", "colocated_gpus"]
    heads = {"shape": "prefill + decode", "gpu_hours_per_million": "GPU-h/Mreq", "margin_pct": "margin %",
             "kv_transfer_bytes_per_request": "KV B/req moved", "pd_send_utilization": "send link busy",
             "colocated_shape": "co-located", "colocated_gpus": "co-located GPUs"}
    lines = ["| " + " | ".join(heads.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_pd_plan(result: PDPlanResult, out_dir) -> None:
    import csv
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = PD_COLUMNS[:11] + [t.key for t in result.terms] + PD_COLUMNS[11:] + ["colocated_shape", "colocated_gpus"]
    for name, rows in (("plan_disagg.csv", result.rows), ("plan_disagg_candidates.csv", result.candidates)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    (out / "plan_disagg.md").write_text(result.format())
    (out / "plan_disagg.json").write_text(json.dumps(
        {"slo": [str(t) for t in result.terms], "plan": result.rows, "candidates": result.candidates,
         "colocated": result.colocated, "evaluations": [e.as_row() for e in result.evaluations]},
        indent=1, default=str) + "\n")


__all__ = ["PDEvaluation", "PDPlanner", "PDPlanResult", "plan_disagg", "format_pd_plan"]
