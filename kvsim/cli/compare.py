"""``kvsim compare``: several methods on the same trace and seed (the work: :mod:`kvsim.compare`)."""

from __future__ import annotations

from pathlib import Path

from kvsim.cli.common import add_run_args, add_trace_arg, engine_config, model_arg, parse_slo
from kvsim.errors import ConfigError


def register(sub) -> None:
    c = sub.add_parser("compare", help="run several methods on the same trace and seed; one table and plots")
    add_trace_arg(c)
    c.add_argument("--methods", default=None, help="comma-separated specs, e.g. none,fp8,kivi:bits=2,h2o:budget=512 "
                   "(default: the --config file's method)")
    c.add_argument("--out", default="out/compare", help="output directory: compare.csv/.md/.png and one replay folder per method")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_args(c)
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from kvsim.compare import compare
    from kvsim.methods import parse_method_list

    if not args.methods:
        raise ConfigError("compare: give the methods to compare with --methods (or method: [...] in --config)")
    methods = parse_method_list(args.methods)
    rows = compare(args.trace, methods, args.out, progress=not args.quiet, model=model_arg(args),
                   hardware=args.hardware, config=engine_config(args), profile=args.profile,
                   slo=parse_slo(args.slo), auto_profile=not args.no_profile, lengths=args.lengths, fmt=args.fmt,
                   skip_invalid=args.skip_invalid, rate_scale=args.rate_scale, limit=args.limit,
                   result_format=args.result_format, allow_profile_mismatch=args.allow_profile_mismatch,
                   engine=args.engine)
    print(Path(args.out, "compare.md").read_text())
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png and one replay folder per method ({len(rows)})")
    return 0
