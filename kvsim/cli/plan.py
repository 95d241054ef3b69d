"""``kvsim plan`` and ``kvsim sweep``: capacity planning and grids of replays (the work: :mod:`kvsim.plan`)."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from kvsim.cli.common import add_engine_args, add_trace_arg, engine_config, model_arg
from kvsim.errors import ConfigError


def register(sub) -> None:
    _add_plan(sub)
    _add_sweep(sub)


# -- command line ----------------------------------------------------------------------------------------------
def _add_plan(sub) -> None:
    from kvsim.plan import planner

    p = sub.add_parser("plan", help="fewest GPUs per method that meet an SLO at the trace's rate (bisection search)",
                       description=planner.__doc__.split("\n\n")[0])
    add_trace_arg(p, optional=True)
    # the trace was an option before every command took it as the first argument; old scripts still work
    p.add_argument("--trace", dest="trace_option", default=None, help=argparse.SUPPRESS)
    p.add_argument("--slo", required=True, help="metric:stat=limit list, e.g. ttft_ms:p99=2000,tpot_ms:p99=100 "
                   "(metrics ttft_ms tpot_ms itl_ms e2el_ms; stats mean p50 p90 p99 max)")
    p.add_argument("--methods", default=None, help="comma-separated method specs, e.g. none,fp8,kivi:bits=2,h2o:budget=512 "
                   "(default: the --config file's method, else none)")
    p.add_argument("--model", default=None, help="shipped short name, Hugging Face id or config.json path (default: llama-3.1-8b)")
    p.add_argument("--hardware", default=None, help="GPU name, `kvsim hardware` (default: h100)")
    p.add_argument("--tp", default=None, help="tensor-parallel degrees to consider, e.g. 1,2,4 "
                   "(default: --tensor-parallel-size, else 1)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="plan for the trace's rate times this")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests")
    p.add_argument("--max-replicas", type=int, default=64, help="search cap on replicas per TP degree")
    p.add_argument("--check-above", action="store_true", help="also replay found+1 replicas and flag non-monotone results")
    p.add_argument("--max-rate", action="store_true", help="also find the highest rate each planned configuration sustains")
    p.add_argument("--max-rate-config", default=None, metavar="REPLICASxTP",
                   help="with --max-rate: search the rate of this fixed configuration instead (e.g. 2x1)")
    p.add_argument("--rate-tol", type=float, default=0.02, help="relative tolerance of the rate search")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one search per method x TP)")
    p.add_argument("--profile", default=None, help="profile JSON (default: a committed one matching model x hardware x TP)")
    p.add_argument("--no-profile", action="store_true", help="use the roofline even when a profile exists")
    p.add_argument("--format", dest="fmt", default=None, help="trace format: kvsim | azure | mooncake (default: detected)")
    p.add_argument("--skip-invalid", action="store_true", help="reject malformed trace lines instead of stopping")
    p.add_argument("--out", default="out/plan", help="writes plan.csv, plan.md, plan_candidates.csv, plan.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    d = p.add_argument_group("across the prefill/decode split (kvsim.plan.disagg, docs/disaggregation.md)")
    d.add_argument("--disagg", action="store_true", help="also search disaggregated clusters: prefill and decode "
                   "instance counts (and --prefill-tp / --decode-tp) for the fewest GPUs, beside co-located serving")
    d.add_argument("--prefill-tp", default=None, help="with --disagg: prefill TP degrees to try, e.g. 1,2 (default: --tp)")
    d.add_argument("--decode-tp", default=None, help="with --disagg: decode TP degrees to try (default: --tp)")
    add_engine_args(p)
    from kvsim.cli.common import add_transfer_args

    add_transfer_args(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from kvsim.plan.planner import _method_specs, plan_capacity

    if args.trace_option is not None:
        if args.trace is not None and args.trace != args.trace_option:
            raise ConfigError(f"plan: two traces given ({args.trace!r} and --trace {args.trace_option!r})")
        args.trace = args.trace_option
    if args.trace is None:
        raise ConfigError("plan: give the trace as the first argument: kvsim plan TRACE --slo ...")
    cfg = engine_config(args)
    if args.tp:
        try:
            tps = [int(x) for x in args.tp.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--tp {args.tp!r}: expected comma-separated integers") from None
    else:
        tps = [cfg.tensor_parallel_size]
    mrc = None
    if args.max_rate_config:
        a, _, b = args.max_rate_config.lower().partition("x")
        try:
            mrc = (int(a), int(b or 1))
        except ValueError:
            raise ConfigError(f"--max-rate-config {args.max_rate_config!r}: expected REPLICASxTP, e.g. 2x1") from None
    from kvsim.cli.common import transfer_config

    tr = transfer_config(args)
    t0 = time.perf_counter()
    if args.disagg:
        return _cmd_plan_disagg(args, cfg, tps, tr, t0)
    if args.prefill_tp or args.decode_tp:
        raise ConfigError("plan: --prefill-tp / --decode-tp go with --disagg")
    if tr is not None and tr.disaggregated:
        raise ConfigError("plan: the instance counts are what --disagg searches; drop --num-prefill-instances / "
                          "--num-decode-instances and add --disagg")
    res = plan_capacity(args.trace, args.slo, _method_specs(args.methods or "none"), model_arg(args), args.hardware, tps,
                        cfg, args.rate_scale, args.limit, args.max_replicas, args.max_rate or mrc is not None, mrc,
                        args.rate_tol, args.check_above, args.profile, not args.no_profile, args.fmt,
                        args.skip_invalid, args.jobs, args.out, progress=not args.quiet, transfer=tr)
    info = res.trace
    rate = info.request_rate
    print(f"kvsim plan: {args.model} on {args.hardware}, trace {args.trace}: {info.count} requests over "
          f"{info.duration_s / args.rate_scale:.1f} s"
          + (f" ({rate * args.rate_scale:.3f} req/s)" if rate else "")
          + f", SLO {', '.join(map(str, res.terms))}; rejected requests count as violations")
    print(res.format())
    print(f"{len(res.evaluations)} replays in {time.perf_counter() - t0:.1f} s; wrote {args.out}/plan.csv, plan.md, "
          "plan_candidates.csv, plan.json", file=sys.stderr)
    return 0


def _tp_list(text, flag, default):
    if not text:
        return default
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None


def _cmd_plan_disagg(args, cfg, tps, tr, t0) -> int:
    """``kvsim plan --disagg``: kvsim.plan.disagg.plan_disagg, printed beside the co-located answer."""
    from kvsim.plan.disagg import plan_disagg
    from kvsim.plan.planner import _method_specs

    if args.max_rate or args.max_rate_config or args.check_above or args.jobs > 1:
        raise ConfigError("plan --disagg: --max-rate, --max-rate-config, --check-above and --jobs apply to the "
                          "co-located search only; run it without --disagg for those")
    shared = {}
    if tr is not None:
        searched = {k: v for k, v in tr.nondefault().items() if k in (
            "num_prefill_instances", "num_decode_instances", "prefill_tensor_parallel_size", "decode_tensor_parallel_size")}
        if searched:
            raise ConfigError(f"plan --disagg searches the instance counts and TP degrees; drop {searched} "
                              "(use --prefill-tp / --decode-tp for the degrees to try)")
        shared = tr.nondefault()
    res = plan_disagg(args.trace, args.slo, _method_specs(args.methods or "none"), model_arg(args), args.hardware,
                      _tp_list(args.prefill_tp, "--prefill-tp", tps), _tp_list(args.decode_tp, "--decode-tp", tps), cfg,
                      shared, args.rate_scale, args.limit, args.max_replicas, True, tps, args.profile,
                      not args.no_profile, args.fmt, args.skip_invalid, args.out, progress=not args.quiet)
    print(f"kvsim plan --disagg: {args.model} on {args.hardware}, trace {args.trace} at x{args.rate_scale:g}, SLO "
          f"{', '.join(map(str, res.terms))}; rejected requests count as violations")
    print(res.format())
    print(f"{len(res.evaluations)} disaggregated replays in {time.perf_counter() - t0:.1f} s; wrote {args.out}/"
          "plan_disagg.csv, plan_disagg.md, plan_disagg_candidates.csv, plan_disagg.json", file=sys.stderr)
    return 0


def _add_sweep(sub) -> None:
    from kvsim.plan import sweep

    p = sub.add_parser("sweep", help="run a grid of replays (methods x knobs x rates x replicas x hardware x model) in parallel",
                       description=sweep.__doc__.split("\n\n")[0])
    p.add_argument("grid", help="grid.yaml (see examples/grid.yaml)")
    p.add_argument("--out", required=True, help="results directory: cells.jsonl, results.csv, results.parquet")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: a Ray cluster")
    p.add_argument("--jobs", type=int, default=None, help="local worker processes (default: CPU count); 1 runs in-process")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: running cluster, else a local one)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that errored before")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from kvsim.plan.executors import SweepStopped
    from kvsim.plan.sweep import run_sweep

    try:
        res = run_sweep(args.grid, args.out, args.executor, args.jobs, not args.quiet, args.retry_failed,
                        args.ray_address)
    except SweepStopped as e:
        name = signal.Signals(e.signum).name
        print(f"sweep: stopped by {name}; finished cells are in {args.out}/cells.jsonl, the same command "
              "runs the rest", file=sys.stderr)
        return 128 + e.signum
    files = ", ".join(str(p) for p in res.paths.values())
    lost = f", {res.lost} lost with their worker: rerun to retry them" if res.lost else ""
    print(f"sweep: {len(res.rows)} cells: ran {res.ran} (failed {res.failed}{lost}), skipped {res.skipped} "
          f"already done; wrote {files}")
    errs = [r for r in res.rows if r.get("status") != "ok"]
    for r in errs[:10]:
        print(f"  failed {r['cell_id']}: {r.get('error')}")
    if len(errs) > 10:
        print(f"  ... and {len(errs) - 10} more (see {args.out}/cells.jsonl)")
    return 1 if errs else 0
