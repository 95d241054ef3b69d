"""Capacity planning and parameter sweeps on top of :mod:`kvsim.replay`.

- :func:`plan_capacity` / :class:`Planner`: the fewest GPUs (replicas x tensor-parallel degree) per
  method that meet an SLO (``kvsim plan``), and the highest rate a configuration sustains;
- :func:`run_sweep`: a grid of replays in worker processes or on Ray (:mod:`kvsim.plan.executors`), one
  results table (``kvsim sweep``);
- :func:`flatten_summary` / :func:`summary_frame`: a replay summary as one flat row / a DataFrame.

See docs/planning.md and docs/api.md.
"""

from kvsim.metrics.slo import SLOTerm, check_slo, goodput_slo, parse_slo_terms
from kvsim.plan.planner import Evaluation, PlanResult, Planner, RateResult, SearchResult, format_plan, plan_capacity, trace_info
from kvsim.plan.sweep import (
    Grid, SweepResult, cell_id, flatten_summary, load_grid, read_cells, run_cell, run_sweep, summary_frame,
)


__all__ = [
    "Evaluation", "Grid", "PlanResult", "Planner", "RateResult", "SLOTerm", "SearchResult", "SweepResult", "cell_id",
    "check_slo", "flatten_summary", "format_plan", "goodput_slo", "load_grid", "parse_slo_terms", "plan_capacity",
    "read_cells", "run_cell", "run_sweep", "summary_frame", "trace_info",
]
