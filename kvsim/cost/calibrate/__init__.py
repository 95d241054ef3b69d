"""``kvsim calibrate``: fit the roofline's efficiency terms per hardware on real-GPU kernel timings.

The package: :mod:`~kvsim.cost.calibrate.data` (the tables fitted on), :mod:`~kvsim.cost.calibrate.model`
(the roofline vectorised over a table, and the parameters), :mod:`~kvsim.cost.calibrate.fitting` (the fits and
:func:`run`), :mod:`~kvsim.cost.calibrate.report` (calibration.yaml and the reports); the command line is
:mod:`kvsim.cli.calibrate`.

Data: every profile in ``kvsim/profiles/imported/`` (Vidur's and LLMServingSim's published per-operator
timings, see their provenance). Each table point is predicted by the roofline formulas of
:mod:`kvsim.cost.roofline` (same FLOP and byte counts, same kernel counts) and the parameters are fitted
by least squares on ``log(predicted) - log(measured)`` (scipy ``least_squares``), each (profile, table)
weighted equally whatever its number of points.

Fitted, per hardware (physical meaning in ``RooflineParams``):

    eff_flops, gemm_half_tokens   GEMM efficiency vs token count     linear.qkv/o/mlp/moe, linear.lm_head
    eff_mem                       streaming bandwidth (weights)      the same GEMMs at small T, linear.other,
                                                                     step.embedding/final_norm/sampler
    kernel_overhead_s             fixed time of one kernel           every op at small sizes
    eff_attn_flops, eff_attn_mem  attention kernels                  attention.prefill.flash, attention.decode.none
    eff_comm, allreduce_latency_s collectives                        comm.all_reduce (NCCL tables)
    attn_skew_decode, attn_skew_mixed  decodes of unequal context    the profiles' ``decode_skew_alpha``
                                                                     (LLMServingSim's skew.csv), averaged

A parameter whose data a hardware lacks (no attention or no all-reduce table) takes the ``default``
value, which is fitted on all hardware at once (efficiencies are fractions of each GPU's datasheet
peaks, so they carry over); ``default`` is also what kvsim uses for hardware without a fit.
``layer_overhead_s`` and ``step_overhead_s`` (time a real step spends outside its kernels) cannot be
seen in kernel timings and are set a priori (:data:`A_PRIORI`), never fitted.

Leave-one-out: for each (hardware, model) pair, everything is refitted without that pair's profiles
(the pair's hardware keeps its own fit only if other models on it remain, else it gets the default
fitted without it), and the withheld tables are predicted. Those params are stored under
``leave_one_out`` in calibration.yaml so ``kvsim validate --no-profile`` can replay a case with a
roofline that never saw its hardware-and-model timings.
"""

from kvsim.cost.calibrate.data import (
    HOPPER_DECODE, LSS_ATTENTION, NOT_FITTED, PROFILES_DIR, OpTable, load_hopper_gemms, load_mixed_tables, load_skew, load_tables,
)
from kvsim.cost.calibrate.fitting import (
    CALIBRATION_YAML, apply_hopper, apply_skew, fit, fit_all, hopper_decode_efficiency, leave_one_out, run, skew_params,
)
from kvsim.cost.calibrate.model import A_PRIORI, NAMES, PARAMS, PRIOR, SKEW, _errors, predict, prefill_flops_factor
from kvsim.cost.calibrate.report import (
    format_markdown, mixed_attention_check, plot_fit, summary_rows, write_calibration_yaml, write_mixed_check,
    write_outputs, yaml_number,
)

__all__ = [
    "A_PRIORI", "CALIBRATION_YAML", "HOPPER_DECODE", "LSS_ATTENTION", "NAMES", "NOT_FITTED", "PARAMS", "PRIOR", "PROFILES_DIR", "SKEW",
    "OpTable", "_errors", "apply_hopper", "apply_skew", "fit", "fit_all", "format_markdown", "hopper_decode_efficiency",
    "leave_one_out", "load_hopper_gemms", "load_mixed_tables", "load_skew", "load_tables", "mixed_attention_check",
    "plot_fit", "predict", "prefill_flops_factor", "run", "skew_params", "summary_rows", "write_calibration_yaml",
    "write_mixed_check", "write_outputs", "yaml_number",
]
