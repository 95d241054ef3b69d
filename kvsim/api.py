"""The Python API: one import for everything the command line does (docs/api.md).

    from kvsim import api
    res = api.replay("traces/sample.jsonl", model="llama-3.1-8b", hardware="h100", method="h2o")
    res.summary["ttft_ms"]["p99"];  res.requests_df()   # pandas, if installed

- a run: :func:`make_spec` (knobs parsed once, into typed objects), :func:`replay`, and for custom wiring
  :func:`build_run` with your own observers (kvsim.engine.events.Observer);
- many runs: :func:`compare` (methods side by side), :func:`bench` (fixed-batch throughput, one point or
  a sweep), :func:`plan` (fewest GPUs for an SLO), :func:`sweep` (a grid in parallel), :func:`validate`
  (replay measured serving runs and report the error).

The work is done in the modules named by each function; this module only gathers them.
"""

from __future__ import annotations

from kvsim.build import (  # noqa: F401 (the API)
    ProfileMismatchWarning,
    Run,
    RunSpec,
    build_replicas,
    build_run,
    check_parallel_shape,
    does_not_fit_message,
    length_ratio_for,
    length_sampler,
    lockstep_dp,
    make_cost,
    make_spec,
    profile_mismatch,
    resolve_method,
)
from kvsim.replay import (  # noqa: F401 (the API)
    REPLAY_OUTPUTS,
    RESULT_FORMATS,
    ReplayResult,
    check_stream_options,
    open_trace,
    replay,
)


def compare(trace, methods, out_dir, progress: bool = True, **replay_kw) -> list[dict]:
    """Every method in ``methods`` on the same trace and seed: one replay folder each, and compare.csv,
    compare.md, compare.png in ``out_dir`` (``kvsim compare``); ``replay_kw``: :func:`make_spec` and
    :func:`replay` keywords. Returns the table's rows."""
    from kvsim.compare import compare as _compare

    return _compare(trace, methods, out_dir, progress=progress, **replay_kw)


def bench(model="llama-3.1-8b", hardware="h100", method="none", batch_size=8, prompt_len=1024, output_len=128,
          config=None, profile=None, auto_profile=True, engine=None, progress: bool = False):
    """Fixed-batch prefill and decode throughput (``kvsim bench``). Scalars: one point, a dict. A list for
    ``method``, ``batch_size`` or ``prompt_len``: the whole sweep, a list of rows (with ratios to ``none``
    where it is among the methods)."""
    from kvsim import bench as _bench

    if not any(isinstance(v, (list, tuple)) for v in (method, batch_size, prompt_len)):
        return _bench.bench(model, hardware, method, batch_size, prompt_len, output_len, config, profile,
                            auto_profile, engine)
    as_list = (lambda v: list(v) if isinstance(v, (list, tuple)) else [v])  # noqa: E731
    return _bench.bench_sweep(as_list(method), as_list(batch_size), as_list(prompt_len), output_len, model, hardware,
                              config, profile, auto_profile, engine, progress)


def plan(trace, slo, methods=("none",), **kw):
    """The fewest GPUs (replicas x tensor-parallel degree) per method that meet ``slo`` (``kvsim plan``;
    keywords: :func:`kvsim.plan.planner.plan_capacity`). Returns a PlanResult."""
    from kvsim.plan.planner import plan_capacity

    return plan_capacity(trace, slo, methods, **kw)


def sweep(grid, out_dir, executor: str = "local", jobs: int | None = None, **kw):
    """A grid of replays (grid.yaml or the same mapping) in worker processes or on Ray (``kvsim sweep``;
    keywords: :func:`kvsim.plan.sweep.run_sweep`). Returns a SweepResult."""
    from kvsim.plan.sweep import run_sweep

    return run_sweep(grid, out_dir, executor, jobs, **kw)


def validate(case_dirs, out_dir=None, **kw):
    """Replay measured serving runs (folders in the shared/validation format) and compare (``kvsim
    validate``; keywords: :func:`kvsim.validate.run.validate`). Returns one CaseResult per case."""
    from kvsim.validate import validate as _validate

    return _validate(case_dirs, out_dir, **kw)


__all__ = [
    "REPLAY_OUTPUTS", "RESULT_FORMATS", "ProfileMismatchWarning", "ReplayResult", "Run", "RunSpec", "bench",
    "build_replicas", "build_run", "check_parallel_shape", "check_stream_options", "compare", "does_not_fit_message",
    "length_ratio_for", "length_sampler", "lockstep_dp", "make_cost", "make_spec", "open_trace", "plan",
    "profile_mismatch", "replay", "resolve_method", "sweep", "validate",
]
