"""Capacity planning: the fewest GPUs (replicas x tensor-parallel degree) that serve a trace within an SLO.

An SLO is a list of terms ``metric:stat=limit`` (``ttft_ms:p99=2000,tpot_ms:p99=100``; the grammar:
:mod:`kvsim.metrics.slo`). A configuration is *feasible* when one replay of the trace meets every term
and rejects no request (a rejected request, e.g. a prompt longer than the context, is an SLO violation).

Search, per method and tensor-parallel degree: exponential search on the replica count (1, 2, 4, ...)
up to the first feasible count, then bisection between the last infeasible and the first feasible one;
``O(log R)`` replays instead of ``R``. Bisection assumes feasibility is monotone in the replica count.
That holds in expectation (more replicas, fewer requests each) but not exactly: routing changes which
requests share a batch, so a percentile can move a little either way. The search therefore always
holds the found count ``r`` (feasible) and ``r - 1`` (infeasible) as evaluated points, and with
``check_above`` also replays ``r + 1`` and flags a non-monotone result.

The highest rate a configuration sustains is found the same way on ``rate_scale`` (exponential search
by doubling or halving, then geometric bisection to a relative tolerance), assuming feasibility is
monotone in the arrival rate.

GPU-hours per million requests = GPUs x trace duration (h) / completed requests x 1e6, where the trace
duration is the span of arrival times of the replayed (scaled, limited) trace: the GPUs are rented for
as long as the traffic lasts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvsim.config import EngineConfig
from kvsim.errors import ConfigError, KvsimError
from kvsim.metrics.slo import check_slo, goodput_slo, parse_slo_terms


# -- one evaluated point --------------------------------------------------------------------------------
@dataclass
class Evaluation:
    method: str
    tensor_parallel_size: int
    num_replicas: int
    rate_scale: float
    feasible: bool
    margin_pct: float | None = None
    worst_term: str | None = None
    values: dict = field(default_factory=dict)
    reason: str = ""
    completed: int = 0
    rejected: int = 0
    duration_s: float = 0.0  # the replay's first arrival to last finish
    error: str | None = None
    wall_s: float = 0.0
    summary: dict | None = None

    @property
    def gpus(self) -> int:
        return self.num_replicas * self.tensor_parallel_size

    def as_row(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("summary", "values")}
        d.update(self.values)
        d["gpus"] = self.gpus
        return d


@dataclass
class TraceInfo:
    count: int
    first_arrival_s: float | None
    last_arrival_s: float | None

    @property
    def duration_s(self) -> float:
        if self.first_arrival_s is None or self.last_arrival_s is None:
            return 0.0
        return self.last_arrival_s - self.first_arrival_s

    @property
    def request_rate(self) -> float | None:
        """(count - 1) / duration, as ``kvsim trace stats`` reports it."""
        return (self.count - 1) / self.duration_s if self.duration_s > 0 else None


def trace_info(trace, fmt=None, skip_invalid=False, limit=None) -> TraceInfo:
    from kvsim.replay import open_trace
    from kvsim.workload.request import Request

    n, first, last = 0, None, None
    for r in open_trace(trace, fmt, skip_invalid, None, 1.0, limit):
        if not isinstance(r, Request):
            continue
        n += 1
        t = r.arrival_time_s
        if t is not None:
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
    return TraceInfo(n, first, last)


# -- the planner ------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The fewest replicas for one (method, TP degree)."""

    method: str
    tensor_parallel_size: int
    status: str  # ok | infeasible | error
    num_replicas: int | None = None
    evaluation: Evaluation | None = None
    below: Evaluation | None = None
    above: Evaluation | None = None
    num_replays: int = 0
    note: str = ""


@dataclass
class RateResult:
    method: str
    tensor_parallel_size: int
    num_replicas: int
    max_rate_scale: float | None
    max_request_rate: float | None
    evaluation: Evaluation | None
    num_replays: int
    note: str = ""


class Planner:
    """Replays one trace under many (method, TP, replicas, rate) points, with a cache of evaluated points.

    ``trace`` is a path (re-read for every replay, streaming) or an iterable of Requests (kept in a list
    and copied for every replay). ``rate_scale`` is the base scaling of the trace's arrival rate.
    """

    def __init__(self, trace, slo, model="llama-3.1-8b", hardware="h100", config: EngineConfig | None = None,
                 profile=None, auto_profile: bool = True, fmt=None, skip_invalid: bool = False,
                 limit: int | None = None, rate_scale: float = 1.0, keep_summaries: bool = False,
                 transfer=None):
        if not isinstance(trace, (str, Path)):
            trace = list(trace)
        self.trace = trace
        self.terms = parse_slo_terms(slo)
        if not self.terms:
            raise ConfigError("plan: an SLO with at least one term is needed, e.g. ttft_ms:p99=2000,tpot_ms:p99=100")
        self.model, self.hardware = model, hardware
        self.config = config or EngineConfig()
        self.profile, self.auto_profile = profile, auto_profile
        self.fmt, self.skip_invalid, self.limit = fmt, skip_invalid, limit
        if not (math.isfinite(rate_scale) and rate_scale > 0):
            raise ConfigError(f"rate_scale={rate_scale} must be a finite number > 0")
        self.rate_scale = float(rate_scale)
        self.keep_summaries = keep_summaries
        #: options every co-located point shares beyond the engine's: the CPU KV tier (kvsim.transfer)
        self.co_transfer = transfer
        self.info = trace_info(trace, fmt, skip_invalid, limit)
        if self.info.count == 0:
            raise ConfigError(f"plan: trace {trace!r} has no requests")
        self._cache: dict[tuple, Evaluation] = {}
        self.log: list[Evaluation] = []
        #: a tqdm bar counting replays (in-process searches only: it does not travel to worker processes)
        self.progress = None

    # -- trace quantities at a rate scale --------------------------------------------------------------
    def duration_s(self, rate_scale: float | None = None) -> float:
        return self.info.duration_s / (rate_scale or self.rate_scale)

    def request_rate(self, rate_scale: float | None = None) -> float | None:
        r = self.info.request_rate
        return r * (rate_scale or self.rate_scale) if r is not None else None

    def gpu_hours_per_million(self, gpus: int, completed: int, rate_scale: float | None = None,
                              fallback_duration_s: float = 0.0) -> float | None:
        d = self.duration_s(rate_scale) or fallback_duration_s
        return gpus * (d / 3600.0) / completed * 1e6 if completed else None

    # -- one point ----------------------------------------------------------------------------------
    def _stream(self, rate_scale: float):
        if isinstance(self.trace, list):
            return [dataclasses.replace(r) if hasattr(r, "__dataclass_fields__") else r for r in self.trace]
        return self.trace

    def evaluate(self, method, tensor_parallel_size: int = 1, num_replicas: int = 1,
                 rate_scale: float | None = None) -> Evaluation:
        from kvsim.build import make_spec
        from kvsim.replay import replay
        from kvsim.methods import parse_method

        meth = parse_method(method).spec_string()
        rs = float(rate_scale if rate_scale is not None else self.rate_scale)
        key = (meth, int(tensor_parallel_size), int(num_replicas), rs)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        cfg = dataclasses.replace(self.config, tensor_parallel_size=int(tensor_parallel_size), num_replicas=int(num_replicas))
        ev = Evaluation(meth, int(tensor_parallel_size), int(num_replicas), rs, False)
        try:
            spec = make_spec(self.model, self.hardware, meth, cfg, self.profile, goodput_slo(self.terms),
                             auto_profile=self.auto_profile, transfer=self.co_transfer)
            res = replay(self._stream(rs), spec=spec, fmt=self.fmt, skip_invalid=self.skip_invalid,
                             keep_rows=False, plot=False, progress=False, rate_scale=rs, limit=self.limit)
        except KvsimError as e:
            ev.error = str(e)
            ev.reason = "error"
        else:
            s = res.summary
            chk = check_slo(s, self.terms)
            ev.feasible = chk["feasible"]
            ev.margin_pct, ev.worst_term = chk["margin_pct"], chk["worst_term"]
            ev.values, ev.reason = chk["values"], chk["reason"]
            ev.completed, ev.rejected, ev.duration_s = s["completed"], s["rejected"], s["duration_s"]
            if self.keep_summaries:
                ev.summary = s
        ev.wall_s = time.perf_counter() - t0
        self._cache[key] = ev
        self.log.append(ev)
        if self.progress is not None:
            self.progress.set_postfix_str(f"{meth} tp{tensor_parallel_size} x{num_replicas} at x{rs:g}", refresh=False)
            self.progress.update(1)
        return ev

    # -- fewest replicas --------------------------------------------------------------------------------
    def min_replicas(self, method, tensor_parallel_size: int = 1, max_replicas: int = 64,
                     check_above: bool = False) -> SearchResult:
        """Exponential search then bisection on the replica count (see the module docstring)."""
        from kvsim.methods import parse_method

        meth = parse_method(method).spec_string()
        tp = int(tensor_parallel_size)
        n0 = len(self.log)
        res = SearchResult(meth, tp, "infeasible")
        lo, hi, r = 0, None, 1  # lo: largest count known infeasible (0: none)
        while True:
            ev = self.evaluate(meth, tp, r)
            if ev.error is not None:
                res.status, res.note = "error", ev.error
                res.num_replays = len(self.log) - n0
                return res
            if ev.feasible:
                hi = r
                break
            lo = r
            if r >= max_replicas:
                break
            r = min(2 * r, max_replicas)
        if hi is None:
            res.note = f"SLO not met with {max_replicas} replicas ({ev.reason})"
            res.evaluation = ev
            res.num_replays = len(self.log) - n0
            return res
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.evaluate(meth, tp, mid).feasible:
                hi = mid
            else:
                lo = mid
        res.status, res.num_replicas = "ok", hi
        res.evaluation = self.evaluate(meth, tp, hi)  # cached
        notes = []
        if hi > 1:
            res.below = self.evaluate(meth, tp, hi - 1)  # cached: bisection's last infeasible point
            if res.below.feasible:  # cannot happen with the invariant above; kept as a guard
                notes.append(f"{hi - 1} replicas also feasible")
        if check_above:
            res.above = self.evaluate(meth, tp, hi + 1)
            if not res.above.feasible:
                notes.append(f"non-monotone: {hi + 1} replicas miss the SLO ({res.above.reason})")
        res.note = "; ".join(notes)
        res.num_replays = len(self.log) - n0
        return res

    # -- highest sustainable rate ---------------------------------------------------------------------
    def max_rate(self, method, tensor_parallel_size: int = 1, num_replicas: int = 1, rel_tol: float = 0.02,
                 max_scale: float = 1024.0, min_scale: float = 1.0 / 1024) -> RateResult:
        """Highest ``rate_scale`` (relative to the raw trace) at which this configuration meets the SLO."""
        from kvsim.methods import parse_method

        meth = parse_method(method).spec_string()
        tp, nr = int(tensor_parallel_size), int(num_replicas)
        n0 = len(self.log)
        ok = lambda s: self.evaluate(meth, tp, nr, s)  # noqa: E731
        base = self.rate_scale
        first = ok(base)
        if first.error is not None:
            return RateResult(meth, tp, nr, None, None, first, len(self.log) - n0, first.error)
        if first.feasible:
            lo, hi = base, None
            s = base * 2
            while s <= max_scale:
                if ok(s).feasible:
                    lo, s = s, s * 2
                else:
                    hi = s
                    break
            if hi is None:
                ev = ok(lo)
                return RateResult(meth, tp, nr, lo, self._rate(lo), ev, len(self.log) - n0,
                                  f"feasible up to the search cap rate_scale={max_scale:g}")
        else:
            hi, lo = base, None
            s = base / 2
            while s >= min_scale:
                if ok(s).feasible:
                    lo = s
                    break
                hi, s = s, s / 2
            if lo is None:
                return RateResult(meth, tp, nr, None, None, first, len(self.log) - n0,
                                  f"SLO not met even at rate_scale={min_scale:g}")
        while hi / lo > 1.0 + rel_tol:
            mid = math.sqrt(lo * hi)
            if ok(mid).feasible:
                lo = mid
            else:
                hi = mid
        return RateResult(meth, tp, nr, lo, self._rate(lo), ok(lo), len(self.log) - n0)

    def _rate(self, scale: float) -> float | None:
        r = self.info.request_rate
        return r * scale if r is not None else None


# -- the plan table ----------------------------------------------------------------------------------------
PLAN_COLUMNS = [
    "method", "status", "tensor_parallel_size", "num_replicas", "gpus", "gpu_hours_per_million", "margin_pct",
    "worst_term", "request_rate", "rate_scale", "completed", "num_replays", "max_rate_scale", "max_request_rate",
    "note",
]


def _plan_row(planner: Planner, res: SearchResult) -> dict:
    row = {"method": res.method, "status": res.status, "tensor_parallel_size": res.tensor_parallel_size,
           "num_replicas": res.num_replicas, "rate_scale": planner.rate_scale,
           "request_rate": planner.request_rate(), "num_replays": res.num_replays, "note": res.note}
    ev = res.evaluation
    if res.status == "ok" and ev is not None:
        row.update(gpus=ev.gpus, margin_pct=ev.margin_pct, worst_term=ev.worst_term, completed=ev.completed,
                   gpu_hours_per_million=planner.gpu_hours_per_million(ev.gpus, ev.completed,
                                                                       fallback_duration_s=ev.duration_s))
        row.update(ev.values)
    elif ev is not None:
        row.update(margin_pct=ev.margin_pct, worst_term=ev.worst_term, completed=ev.completed)
        row.update(ev.values)
    return row


def _best(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return dict(rows[0], note="; ".join(f"tp={r['tensor_parallel_size']}: {r['note'] or r['status']}" for r in rows))
    return min(ok, key=lambda r: (r["gpus"], -(r["margin_pct"] or 0.0), r["tensor_parallel_size"]))


def _search_task(args):
    planner, method, tp, max_replicas, check_above = args
    res = planner.min_replicas(method, tp, max_replicas, check_above)
    return _plan_row(planner, res), planner.log


def _rate_task(args):
    planner, method, tp, nr, rel_tol = args
    return planner.max_rate(method, tp, nr, rel_tol), planner.log


def _map(fn, tasks, jobs: int, bar=None):
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]  # the planner's own bar counts the replays
    from concurrent.futures import ProcessPoolExecutor

    from kvsim.plan.executors import mp_context, tie_to_parent

    out = []
    ctx = mp_context()
    parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else None
    # workers die with the planner, however it ends (as a sweep's do)
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=tie_to_parent,
                             initargs=(parent,)) as ex:
        for r in ex.map(fn, tasks):
            out.append(r)
            if bar is not None:
                bar.update(len(r[1]))  # the replays that search ran
    return out


@dataclass
class PlanResult:
    rows: list[dict]  # one per method: the cheapest feasible configuration
    candidates: list[dict]  # one per (method, TP degree)
    evaluations: list[Evaluation]
    trace: TraceInfo
    terms: tuple

    def df(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def format(self) -> str:
        return format_plan(self.rows, self.terms)


def plan_capacity(trace, slo, methods=("none",), model="llama-3.1-8b", hardware="h100",
                  tensor_parallel_sizes=(1,), config: EngineConfig | None = None, rate_scale: float = 1.0,
                  limit: int | None = None, max_replicas: int = 64, max_rate: bool = False,
                  max_rate_config: tuple[int, int] | None = None, rate_tol: float = 0.02, check_above: bool = False,
                  profile=None, auto_profile: bool = True, fmt=None, skip_invalid: bool = False, jobs: int = 1,
                  out_dir=None, progress: bool = False, transfer=None) -> PlanResult:
    """Per method, the fewest GPUs (replicas x TP from ``tensor_parallel_sizes``) meeting ``slo``.

    With ``max_rate``, also the highest rate each method's planned configuration sustains (or the fixed
    ``max_rate_config = (replicas, tp)``). Writes plan.csv / plan.md / plan.json when ``out_dir`` is given.
    ``progress``: a bar on stderr counting replays (off when stderr is not a terminal).
    """
    from kvsim.methods import parse_method

    specs = _method_specs(methods) if isinstance(methods, str) else [parse_method(m).spec_string() for m in methods]
    planner = Planner(trace, slo, model, hardware, config, profile, auto_profile, fmt, skip_invalid, limit, rate_scale,
                      transfer=transfer)
    tps = sorted({int(t) for t in tensor_parallel_sizes})
    tasks = [(planner, m, tp, max_replicas, check_above) for m in specs for tp in tps]
    bar = None
    if progress:
        from tqdm import tqdm

        # the number of replays a bisection needs is not known in advance: a count and a rate
        bar = tqdm(unit="replay", desc="plan", file=sys.stderr, mininterval=0.5, disable=None)
        if jobs <= 1 or len(tasks) <= 1:
            planner.progress = bar
    evals: list[Evaluation] = []
    candidates = []
    for row, log in _map(_search_task, tasks, jobs, bar):
        candidates.append(row)
        if jobs > 1:
            evals.extend(log)
    if jobs <= 1:
        evals = list(planner.log)
    rows = [_best([c for c in candidates if c["method"] == m]) for m in specs]
    if max_rate:
        rtasks, idx = [], []
        for i, r in enumerate(rows):
            if max_rate_config is not None:
                nr, tp = max_rate_config
            elif r["status"] == "ok":
                nr, tp = r["num_replicas"], r["tensor_parallel_size"]
            else:
                continue
            rtasks.append((planner, r["method"], tp, nr, rate_tol))
            idx.append(i)
        n_before = len(planner.log)
        if bar is not None and (jobs <= 1 or len(rtasks) <= 1):
            planner.progress = bar
        for i, (rr, log) in zip(idx, _map(_rate_task, rtasks, jobs, bar)):
            rows[i]["max_rate_scale"] = rr.max_rate_scale
            rows[i]["max_request_rate"] = rr.max_request_rate
            rows[i]["max_rate_config"] = f"{rr.num_replicas}x{rr.tensor_parallel_size}"
            if rr.note:
                rows[i]["note"] = "; ".join(filter(None, [rows[i].get("note"), f"max rate: {rr.note}"]))
            if jobs > 1:
                evals.extend(log)
        if jobs <= 1:
            evals.extend(planner.log[n_before:])
    planner.progress = None
    if bar is not None:
        bar.close()
    result = PlanResult(rows, candidates, evals, planner.info, planner.terms)
    if out_dir is not None:
        write_plan(result, out_dir, {"trace": str(trace) if isinstance(trace, (str, Path)) else "<requests>",
                                     "model": getattr(model, "name", model), "hardware": hardware, "rate_scale": rate_scale, "limit": limit,
                                     "tensor_parallel_sizes": tps, "max_replicas": max_replicas})
    return result


def _method_specs(text: str) -> list[str]:
    from kvsim.methods import parse_method_list

    return [m.spec_string() for m in parse_method_list(text)]


def _fmt(v, nd=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def format_plan(rows: list[dict], terms=()) -> str:
    term_cols = [t.key for t in terms]
    cols = ["method", "status", "tensor_parallel_size", "num_replicas", "gpus", "gpu_hours_per_million",
            "margin_pct", "worst_term", *term_cols]
    if any("max_request_rate" in r for r in rows):
        cols += ["max_rate_config", "max_rate_scale", "max_request_rate"]
    heads = {"tensor_parallel_size": "tp", "num_replicas": "replicas", "gpu_hours_per_million": "GPU-h/Mreq",
             "margin_pct": "margin %", "max_rate_scale": "max rate x", "max_request_rate": "max req/s",
             "max_rate_config": "at"}
    lines = ["| " + " | ".join(heads.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_plan(result: PlanResult, out_dir, meta: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    term_cols = [t.key for t in result.terms]
    cols = PLAN_COLUMNS[:8] + term_cols + PLAN_COLUMNS[8:] + ["max_rate_config"]
    for name, rows in (("plan.csv", result.rows), ("plan_candidates.csv", result.candidates)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    (out / "plan.md").write_text(result.format())
    doc = {"meta": meta or {}, "slo": [str(t) for t in result.terms],
           "trace": {"count": result.trace.count, "duration_s": result.trace.duration_s,
                     "request_rate": result.trace.request_rate},
           "plan": result.rows, "candidates": result.candidates,
           "evaluations": [e.as_row() for e in result.evaluations]}
    (out / "plan.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out
