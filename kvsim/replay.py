"""A replay: a trace through a built run (kvsim.build), streamed into summary.json, requests.csv and
timeline.csv/.png (``kvsim replay``; the Python API is :func:`kvsim.api.replay`)."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvsim.build import RunSpec, build_run, length_ratio_for, length_sampler, make_spec
from kvsim.config import EngineConfig
from kvsim.errors import ConfigError
from kvsim.metrics.collector import Recorder
from kvsim.metrics.progress import ArrivalProgress, make_bar
from kvsim.metrics.slo import SLO, parse_goodput_slo

#: what ``--result-format`` accepts: kvsim's summary.json only, or vLLM's benchmark result beside it
RESULT_FORMATS = ("kvsim", "vllm")


@dataclass
class ReplayResult:
    summary: dict
    rows: list | None = None
    out_dir: Path | None = None
    #: what the links carried when (kvsim.engine.kvlink.LinkLog): runs with P/D or a CPU tier only
    link_log: object = None

    def requests_df(self):
        import pandas as pd

        if self.rows is not None:
            return pd.DataFrame(self.rows)
        return pd.read_csv(self.out_dir / "requests.csv")


def open_trace(trace, fmt=None, skip_invalid=False, max_model_len=None, rate_scale: float = 1.0, limit: int | None = None):
    """A path (any supported format) or an iterable of Requests -> a stream of Request/InvalidRecord."""
    from kvsim.workload import readers

    check_stream_options(rate_scale, limit)
    if isinstance(trace, (str, Path)):
        stream = readers.read_trace(trace, fmt, skip_invalid=skip_invalid, max_model_len=max_model_len)
    else:
        stream = iter(trace)
    if rate_scale != 1.0:
        stream = _scaled(stream, rate_scale)
    if limit is not None:
        stream = _limited(stream, limit)
    return stream


def check_stream_options(rate_scale, limit) -> None:
    """``rate_scale`` a finite number > 0 (NaN would make every arrival NaN), ``limit`` a count >= 1."""
    if isinstance(rate_scale, bool) or not isinstance(rate_scale, (int, float)) or not (
            math.isfinite(rate_scale) and rate_scale > 0):
        raise ConfigError(f"rate_scale={rate_scale!r} must be a finite number > 0")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r} must be a positive integer (the number of requests to replay)")


def _scaled(stream, k):
    # copies: a caller's list of requests must replay the same way twice
    for r in stream:
        if r.arrival_time_s is not None:
            r = copy.copy(r)
            r.arrival_time_s = r.arrival_time_s / k
        yield r


def _limited(stream, n):
    for i, r in enumerate(stream):
        if i >= n:
            return
        yield r


#: the files a replay writes into its output folder
REPLAY_OUTPUTS = ("requests.csv", "timeline.csv", "links.csv", "timeline.png", "vllm_result.json", "summary.json")


def replay(trace, model="llama-3.1-8b", hardware="h100", method=None, config: EngineConfig | None = None,
           profile=None, slo: SLO | dict | None = None, out_dir=None, fmt=None, skip_invalid=False,
           progress: bool | str = False, keep_rows: bool | None = None, fast_forward: bool = True,
           check_invariants: bool = False, rate_scale: float = 1.0, limit: int | None = None,
           spec: RunSpec | None = None, timeline_interval_s: float = 1.0, plot: bool = True,
           total_hint: int | None = None, auto_profile: bool = True, lengths="auto",
           result_format: str = "kvsim") -> ReplayResult:
    """Replay a trace; with ``out_dir``, write summary.json, requests.csv, timeline.csv/.png (and, with
    ``result_format="vllm"``, vllm_result.json: the flat keys of vLLM's benchmark_serving result)."""
    if isinstance(slo, dict):
        slo = SLO(**slo)
    elif slo is not None and not isinstance(slo, SLO):
        slo = parse_goodput_slo(slo)  # "ttft_ms=2000,tpot_ms=100": the SLO grammar of kvsim.metrics.slo
    if result_format not in RESULT_FORMATS:
        raise ConfigError(f"result_format={result_format!r}: must be one of {', '.join(RESULT_FORMATS)}")
    spec = spec or make_spec(model, hardware, method, config, profile, slo, auto_profile=auto_profile, lengths=lengths)
    check_stream_options(rate_scale, limit)
    out = Path(out_dir) if out_dir is not None else None
    if out is None:
        return _replay(trace, spec, None, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants,
                       rate_scale, limit, timeline_interval_s, plot, total_hint, result_format)
    from kvsim.outputs import StagedDir, refuse_overwriting_inputs

    refuse_overwriting_inputs(out, REPLAY_OUTPUTS, [trace, getattr(spec.profile, "path", None)])
    # written into a staging folder and moved into place at the end: a failed or killed run leaves the
    # previous outputs untouched instead of new partial CSVs beside an old summary.json
    staged = StagedDir(out)
    with staged as tmp:
        res = _replay(trace, spec, tmp, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants,
                      rate_scale, limit, timeline_interval_s, plot, total_hint, result_format)
        staged.publish(REPLAY_OUTPUTS, last="summary.json")
    res.out_dir = out
    return res


def _replay(trace, spec, out, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants, rate_scale,
            limit, timeline_interval_s, plot, total_hint, result_format="kvsim") -> ReplayResult:
    if out is not None:
        req_f = open(out / "requests.csv", "w", newline="")
        tl_f = open(out / "timeline.csv", "w", newline="")
    else:
        req_f = tl_f = None
    keep = keep_rows if keep_rows is not None else out is None
    # KV moved beyond the GPU (P/D, CPU tier): extra request columns, a link log; a plain run gets neither
    tr = spec.transfer
    link_log = None
    extra = {}
    if tr is not None:
        from kvsim.engine.kvlink import LinkLog
        from kvsim.metrics.transfer import TRANSFER_COLUMNS, transfer_values

        link_log = LinkLog(timeline_interval_s)
        extra = dict(extra_columns=TRANSFER_COLUMNS, extra_values=transfer_values)
    rec = Recorder(req_f, tl_f, spec.slo, timeline_interval_s, keep_rows=keep, **extra)
    try:
        observers = [rec]
        bar = None
        if progress:
            total = total_hint if total_hint is not None else (_count_lines(trace) if isinstance(trace, (str, Path)) else None)
            bar = make_bar(total, progress if isinstance(progress, str) else "replay")
            observers.append(ArrivalProgress(bar))
        lengths = length_ratio_for(spec)
        run = build_run(spec, observers, length_sampler(spec, lengths), fast_forward, check_invariants,
                        link_log=link_log)
        wall0 = time.perf_counter()
        # no max_model_len for the reader: an over-long prompt is a request the engine rejects
        # (exceeds_max_model_len) and counts, as vLLM answers it with an error and serves the rest
        run.run(open_trace(trace, fmt, skip_invalid, None, rate_scale, limit))
        wall = time.perf_counter() - wall0
        if bar is not None:
            bar.close()
    finally:
        if req_f:
            req_f.close()
            tl_f.close()
    from kvsim.metrics.summary import build_summary
    summary = build_summary(spec, rec, run.replicas, lengths, run.sim, wall)
    if tr is not None:
        from kvsim.metrics.transfer import transfer_summary

        span = max((r.kv_last_s for r in run.replicas), default=0.0) - (rec.first_arrival_s or 0.0)
        summary.update(transfer_summary(spec, run.replicas, run.cluster, link_log, rec, span))
        summary["transfer_options"] = tr.nondefault()
    if rec.num_arrivals == 0:
        where = f" {trace}" if isinstance(trace, (str, Path)) else ""
        print(f"kvsim: warning: the trace{where} has no requests; the summary is all zeros", file=sys.stderr)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if result_format == "vllm":
            from kvsim.metrics.summary import vllm_result
            (out / "vllm_result.json").write_text(json.dumps(vllm_result(summary)) + "\n")
        if link_log is not None:
            link_log.write_csv(out / "links.csv")
        if plot:
            from kvsim.metrics.plots import plot_timeline
            plot_timeline(out / "timeline.csv", out / "timeline.png", title=f"{spec.model.name} / {spec.hardware.name} / {spec.method.spec_string()}",
                          links_csv=out / "links.csv" if link_log is not None else None)
    return ReplayResult(summary, rec.rows, out, link_log)


def _count_lines(path) -> int | None:
    """Lines of a trace file (the progress bar's total): a last line without a newline counts too, an
    Azure CSV's header does not. Compressed files are not counted (None: the bar shows a rate only)."""
    if str(path).endswith(".gz"):
        return None
    try:
        n, last = 0, b"\n"
        with open(path, "rb") as f:
            for buf in iter(lambda: f.read(1 << 20), b""):
                n += buf.count(b"\n")
                last = buf[-1:]
        if last != b"\n":
            n += 1
        return max(0, n - (1 if str(path).endswith(".csv") else 0))
    except OSError:
        return None
