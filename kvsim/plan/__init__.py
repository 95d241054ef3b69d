"""Capacity planning and parameter sweeps on top of :mod:`kvsim.api`.

- :func:`plan_capacity` / :class:`Planner`: the fewest GPUs (replicas x tensor-parallel degree) per
  method that meet an SLO (``kvsim plan``), and the highest rate a configuration sustains;
- :func:`run_sweep`: a grid of replays in worker processes or on Ray, one results table (``kvsim sweep``);
- :func:`flatten_summary` / :func:`summary_frame`: a replay summary as one flat row / a DataFrame.

See docs/planning.md and docs/api.md.
"""

from kvsim.plan.planner import (
    Evaluation, PlanResult, Planner, RateResult, SearchResult, SLOTerm, check_slo, format_plan, goodput_slo,
    parse_slo_terms, plan_capacity, trace_info,
)
from kvsim.plan.sweep import (
    Grid, SweepResult, cell_id, flatten_summary, load_grid, read_cells, run_cell, run_sweep, summary_frame,
)


def register(sub) -> None:
    """Add ``kvsim plan`` and ``kvsim sweep`` to the CLI (called from kvsim.cli's _EXTRA_COMMANDS)."""
    from kvsim.plan.planner import add_plan_parser
    from kvsim.plan.sweep import add_sweep_parser

    add_plan_parser(sub)
    add_sweep_parser(sub)


__all__ = [
    "Evaluation", "Grid", "PlanResult", "Planner", "RateResult", "SLOTerm", "SearchResult", "SweepResult", "cell_id",
    "check_slo", "flatten_summary", "format_plan", "goodput_slo", "load_grid", "parse_slo_terms", "plan_capacity",
    "read_cells", "register", "run_cell", "run_sweep", "summary_frame", "trace_info",
]
