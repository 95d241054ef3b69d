"""``kvsim compare``: several methods on the same trace and seed (the work: :mod:`kvsim.compare`)."""

from __future__ import annotations

from pathlib import Path

from kvsim.cli.common import add_trace_command, engine_config, model_arg, parse_slo
from kvsim.errors import ConfigError


def register(sub) -> None:
    c = add_trace_command(sub, "compare", "run several methods on the same trace and seed; one table and plots",
                          _cmd_compare, "out/compare",
                          "output directory: compare.csv/.md/.png and one replay folder per method", "no progress bars")
    c.add_argument("--methods", default=None, help="comma-separated specs, e.g. none,fp8,kivi:bits=2,h2o:budget=512 "
                   "(default: the --config file's method)")


def _cmd_compare(args) -> int:
    from kvsim.compare import compare
    from kvsim.methods import parse_method_list
    from kvsim.cli.common import transfer_config

    if not args.methods:
        raise ConfigError("compare: give the methods to compare with --methods (or method: [...] in --config)")
    methods = parse_method_list(args.methods)
    rows = compare(args.trace, methods, args.out, progress=not args.quiet, model=model_arg(args),
                   hardware=args.hardware, config=engine_config(args), profile=args.profile,
                   slo=parse_slo(args.slo), auto_profile=not args.no_profile, lengths=args.lengths, fmt=args.fmt,
                   skip_invalid=args.skip_invalid, rate_scale=args.rate_scale, limit=args.limit,
                   result_format=args.result_format, allow_profile_mismatch=args.allow_profile_mismatch,
                   engine=args.engine, transfer=transfer_config(args))
    print(Path(args.out, "compare.md").read_text())
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png and one replay folder per method ({len(rows)})")
    return 0
