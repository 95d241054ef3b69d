"""``kvsim validate``: replay a measured serving run and say how far kvsim is from it.

- :mod:`kvsim.validate.case`: the measured-case format (run.yaml, measured.csv, anchor.txt, steps.csv) and
  the requests to replay;
- :mod:`kvsim.validate.run`: the replay with a step log, the join by ``request_id``, the errors and the
  per-step check of the cost model;
- :mod:`kvsim.validate.report`: the files written and the tables printed.

The command line is :mod:`kvsim.cli.validate`; the Python API :func:`kvsim.api.validate`.
"""

from kvsim.validate.case import (
    CLIENT_OVERHEAD_MS, GPU_SKUS, MAX_KV_COLUMN, METRICS, STEP_COLUMNS, Case, PromptRepetition, case_client_overhead_ms,
    case_requests, hardware_name, load_case, measured_at, model_name, read_anchor, repeated_prompts,
    vllm_async_by_default,
)
from kvsim.validate.report import (
    CLIENT_TARGETS, ERROR_COLUMNS, format_case_md, format_table, target_pct, write_case_outputs, write_errors_csv,
)
from kvsim.validate.run import (
    STATS, CaseResult, StepLog, diagnostics, err_pct, profile_engine, resolve_spec, simulate, stat, step_errors,
    throughput, validate, validate_case,
)

__all__ = [
    "CLIENT_OVERHEAD_MS", "CLIENT_TARGETS", "Case", "CaseResult", "ERROR_COLUMNS", "GPU_SKUS", "MAX_KV_COLUMN", "METRICS",
    "PromptRepetition", "STATS", "STEP_COLUMNS", "StepLog", "case_client_overhead_ms", "case_requests", "diagnostics",
    "err_pct", "format_case_md", "format_table", "hardware_name", "load_case", "measured_at", "model_name",
    "profile_engine", "read_anchor", "repeated_prompts", "resolve_spec", "simulate", "stat", "step_errors",
    "target_pct", "throughput", "validate", "validate_case", "vllm_async_by_default", "write_case_outputs",
    "write_errors_csv",
]
