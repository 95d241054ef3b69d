"""``kvsim bench``: fixed-batch prefill and decode throughput, one point or a sweep (the work:
:mod:`kvsim.bench`)."""

from __future__ import annotations

import json
from pathlib import Path

from kvsim.bench import GRID_KEYS, _as_list, _int_list, bench_sweep, format_table, load_grid, write_outputs
from kvsim.cli.common import add_engine_args, engine_config, model_arg


def register(sub) -> None:
    b = sub.add_parser("bench", help="fixed-batch prefill and decode throughput (kernel-paper style); sweeps in one process")
    b.add_argument("--model", default=None, help="shipped short name, Hugging Face id or config.json path (default: llama-3.1-8b)")
    b.add_argument("--hardware", default=None, help="GPU name, `kvsim hardware` (default: h100)")
    b.add_argument("--engine", default=None, help="serving engine whose step model to use: vllm (default) or a fitted "
                                                 "one such as lmdeploy-0.6 (kvsim methods lists the fitted engines' data)")
    b.add_argument("--method", default=None, help="method spec, or several separated by commas "
                                                 "(none,kivi:bits=4,h2o:budget=512,window=32)")
    b.add_argument("--batch-size", default=None, help="batch size, or a comma-separated list (default 8)")
    b.add_argument("--prompt-len", default=None, help="prompt length in tokens, or a comma-separated list (default 1024)")
    b.add_argument("--output-len", type=int, default=None,
                   help="generated tokens per request, the prefill step samples the first (default 128)")
    b.add_argument("--grid", default=None, help="YAML file with any of: " + ", ".join(GRID_KEYS)
                   + " (flags and --config take precedence)")
    b.add_argument("--profile", default=None, help="profile JSON (default: a committed one matching model x hardware x TP)")
    b.add_argument("--no-profile", action="store_true", help="use the roofline even when a profile exists")
    b.add_argument("--out", default=None, help="folder for bench.csv and bench.json")
    b.add_argument("--json", action="store_true", help="print the rows as JSON (one object for a single point)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(b)
    b.set_defaults(func=_cmd_bench, fill_run_keys=_fill_from_grid)


def _fill_from_grid(args) -> None:
    """Run keys from ``--grid`` where neither a flag nor ``--config`` gave them (then kvsim's defaults)."""
    if not args.grid:
        return
    grid = load_grid(args.grid)
    for key in ("model", "hardware", "engine", "output_len"):
        if getattr(args, key) is None and key in grid:
            setattr(args, key, grid[key])
    if args.method is None and "method" in grid:
        args.method = ",".join(str(x) for x in _as_list(grid["method"]))


def _cmd_bench(args) -> int:
    from kvsim.methods import parse_method_list

    grid = load_grid(args.grid) if args.grid else {}
    config = engine_config(args)
    methods = parse_method_list(args.method or "none")
    bs = args.batch_size if args.batch_size is not None else grid.get("batch_size", 8)
    ps = args.prompt_len if args.prompt_len is not None else grid.get("prompt_len", 1024)
    batch_sizes = _int_list(bs, "--batch-size") if isinstance(bs, str) else [int(x) for x in _as_list(bs)]
    prompt_lens = _int_list(ps, "--prompt-len") if isinstance(ps, str) else [int(x) for x in _as_list(ps)]
    rows = bench_sweep(methods, batch_sizes, prompt_lens, output_len=args.output_len or 128,
                       model=model_arg(args), hardware=args.hardware, config=config, profile=args.profile,
                       auto_profile=not args.no_profile, engine=args.engine, progress=not args.quiet)
    if args.out:
        write_outputs(rows, Path(args.out))
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    else:
        r0 = rows[0]
        print(f"{r0['model']} / {r0['hardware']} / engine {r0['engine']}  ({r0['cost_model']})  N={r0['output_len']}")
        print(format_table(rows))
        if args.out:
            print(f"wrote {args.out}/bench.csv and bench.json ({len(rows)} rows)")
    return 0
