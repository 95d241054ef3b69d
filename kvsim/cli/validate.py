"""``kvsim validate``: replay measured serving runs and report kvsim's error (the work: :mod:`kvsim.validate`)."""

from __future__ import annotations


def register(sub) -> None:
    from kvsim.validate.case import CLIENT_OVERHEAD_MS

    v = sub.add_parser("validate", help="replay measured serving runs (shared/validation format) and report kvsim's error")
    v.add_argument("cases", nargs="+", metavar="CASE_DIR", help="folders with run.yaml + measured.csv")
    v.add_argument("--out", default="out/validate", help="output directory (errors.csv, errors.md, one folder per case)")
    v.add_argument("--profile", default=None, help="profile JSON to use (default: the committed one for the case's model x GPU x TP)")
    v.add_argument("--no-profile", action="store_true", help="the calibrated roofline alone")
    v.add_argument("--roofline-params", choices=["withheld", "calibrated"], default="withheld",
                   help="without a profile: params fitted with this case's (hardware, model) withheld, or on all profiles")
    v.add_argument("--arrivals", choices=["measured", "workload"], default="measured",
                   help="realised arrival times from measured.csv (default) or the workload's intended ones")
    v.add_argument("--hardware", default=None, help="model every case on this GPU instead of the one its run.yaml "
                   "names (needed for a case measured on a CPU, e.g. kvprof replay --tiny)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--prompt-identity", choices=["infer", "none"], default="infer",
                   help="a workload without prefix hashes whose prompt lengths repeat in a cycle is read as the same "
                        "prompts sent in turn (infer, default), or every prompt is taken as distinct (none)")
    v.add_argument("--client-overhead-ms", type=float, default=None,
                   help="added to every predicted TTFT and e2el (default: the case's own: "
                        f"{CLIENT_OVERHEAD_MS} ms for times taken at an HTTP client, 0 for times taken in the engine)")
    v.add_argument("--no-plot", action="store_true", help="skip latency.png per case")
    v.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    from kvsim.validate import format_case_md, format_table, validate

    results = validate(args.cases, args.out, not args.no_profile, args.profile, args.roofline_params, args.arrivals,
                       plot=not args.no_plot, hardware=args.hardware, progress=not args.quiet,
                       prompt_identity=args.prompt_identity, client_overhead_ms=args.client_overhead_ms)
    print(format_table(results))
    for r in results:
        print(format_case_md(r))
    print(f"outputs: {args.out}/errors.csv errors.md, per case: requests_joined.csv steps.csv latency.png")
    return 0
