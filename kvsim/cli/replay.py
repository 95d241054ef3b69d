"""``kvsim replay`` and ``kvsim trace``: one trace through the modelled engine; trace statistics and
synthetic traces."""

from __future__ import annotations

import json
from pathlib import Path

from kvsim.cli.common import Parser, add_trace_arg, add_trace_command, spec_from_args
from kvsim.errors import KvsimError


def register(sub) -> None:
    r = add_trace_command(sub, "replay", "replay a trace through the modelled engine", cmd_replay, "out/replay",
                          "output directory")
    r.add_argument("--method", default=None, help="compression method, e.g. h2o:budget=512,window=32 (`kvsim methods`) "
                                                  "(default: none)")

    t = sub.add_parser("trace", help="trace utilities: stats, gen")
    tsub = t.add_subparsers(dest="trace_cmd", required=True, parser_class=Parser, metavar="SUBCOMMAND")
    ts = tsub.add_parser("stats", help="count, duration, rate and length percentiles")
    add_trace_arg(ts)
    ts.add_argument("--format", dest="fmt", default=None, help="kvsim | azure | mooncake (default: detected)")
    ts.add_argument("--skip-invalid", action="store_true", help="count malformed lines instead of stopping")
    ts.add_argument("--json", action="store_true", help="print one JSON object")
    tg = tsub.add_parser("gen", help="generate a synthetic trace (Poisson or Gamma arrivals)")
    tg.add_argument("--out", required=True, help="trace file to write (kvsim JSONL; .gz compresses)")
    tg.add_argument("--num-requests", type=int, default=1000, help="requests to generate")
    tg.add_argument("--rate", type=float, default=1.0, help="requests per second")
    tg.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson", help="inter-arrival distribution")
    tg.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times (gamma)")
    tg.add_argument("--lengths-csv", default=None, help="CSV with num_prefill_tokens,num_decode_tokens columns "
                                                        "to draw lengths from (default: fixed lengths)")
    tg.add_argument("--prompt-tokens", type=int, default=512, help="fixed prompt length")
    tg.add_argument("--output-tokens", type=int, default=128, help="fixed output length")
    tg.add_argument("--seed", type=int, default=0, help="random seed")
    t.set_defaults(func=cmd_trace)


def cmd_replay(args) -> int:
    from kvsim.metrics.summary import format_summary
    from kvsim.replay import replay

    spec = spec_from_args(args, args.method)
    res = replay(args.trace, spec=spec, out_dir=args.out, fmt=args.fmt, skip_invalid=args.skip_invalid,
                 progress=not args.quiet, rate_scale=args.rate_scale, limit=args.limit,
                 result_format=args.result_format)
    print(format_summary(res.summary))
    extra = " vllm_result.json" if args.result_format == "vllm" else ""
    if spec.transfer is not None:
        from kvsim.metrics.transfer import format_transfer

        print(format_transfer(res.summary))
        extra += " links.csv"
    print(f"  outputs: {args.out}/summary.json requests.csv timeline.csv timeline.png{extra}")
    return 0


def cmd_trace(args) -> int:
    from kvsim.workload import readers, stats

    if args.trace_cmd == "stats":
        d = stats.trace_stats(readers.read_trace(args.trace, args.fmt, skip_invalid=args.skip_invalid))
        print(json.dumps(d, indent=2) if args.json else stats.format_stats(d))
        return 0
    if args.trace_cmd == "gen":
        from kvsim.workload import synthetic

        if Path(args.out).is_dir():
            raise KvsimError(f"--out {args.out!r} is a folder; trace gen writes one file (e.g. {args.out}/trace.jsonl)")
        lengths = synthetic.LengthStats.from_csv(args.lengths_csv) if args.lengths_csv else synthetic.FixedLengths(args.prompt_tokens, args.output_tokens)
        reqs = synthetic.synthetic_requests(args.num_requests, args.rate, seed=args.seed, arrival=args.arrival, cv=args.cv, lengths=lengths)
        readers.write_trace(reqs, args.out)
        print(f"wrote {args.num_requests} requests to {args.out}")
        return 0
    return 2
