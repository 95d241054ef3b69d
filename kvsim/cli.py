"""``kvsim`` command line: argument parsing only; the work is in :mod:`kvsim.api`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsim.config import EngineConfig, FIELDS, config_from_mapping, load_config_file
from kvsim.errors import KvsimError
from kvsim.metrics.collector import SLO

ENGINE_FLAGS = [
    ("tensor_parallel_size", int, "GPUs per replica (weights and KV split, all-reduce per layer)"),
    ("data_parallel_size", int, "engine ranks per replica group (each its own scheduler and KV cache)"),
    ("max_num_seqs", int, "most sequences in one step (default: vLLM V1's, by GPU memory)"),
    ("max_num_batched_tokens", int, "token budget per step (default: vLLM V1's, by GPU memory)"),
    ("max_model_len", int, "context limit (default: the model's max_position_embeddings)"),
    ("block_size", int, "tokens per KV block (default 16)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory vLLM may use (default 0.9)"),
    ("kv_cache_dtype", str, "auto | fp8 (fp8 implies --method fp8)"),
    ("num_gpu_blocks_override", int, "pin the KV block count per replica"),
    ("seed", int, "seed for sampled output lengths (default 0)"),
]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine options (vLLM names; defaults as vLLM V1 v0.19)")
    g.add_argument("--config", help="YAML file of engine options (vLLM names); flags given here override it")
    for name, typ, text in ENGINE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    g.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true", default=None,
                   help="split MoE experts across the data-parallel ranks")
    for name, text in (("enable_chunked_prefill", "chunked prefill (default on)"),
                       ("enable_prefix_caching", "automatic prefix caching from prefix_hashes (default on)")):
        flag = name.replace("_", "-")
        g.add_argument(f"--{flag}", dest=name, action="store_true", default=None, help=text)
        g.add_argument(f"--no-{flag}", dest=name, action="store_false")
    g.add_argument("--prefix-caching", dest="enable_prefix_caching", action="store_true", help=argparse.SUPPRESS)
    k = p.add_argument_group("cluster and scheduling (kvsim)")
    k.add_argument("--num-replicas", dest="num_replicas", type=int, default=None, help="independent replicas (default 1)")
    k.add_argument("--router", choices=["round-robin", "least-outstanding-tokens", "vllm-dp"], default=None)
    k.add_argument("--scheduler", choices=["chunked", "prefill-first"], default=None,
                   help="chunked: vLLM V1 (default); prefill-first: vLLM V0 without chunked prefill")


def engine_config(args) -> EngineConfig:
    base = EngineConfig()
    if getattr(args, "config", None):
        base, _ = load_config_file(args.config)
    flags = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    cfg, _ = config_from_mapping(flags, source="command line", base=base)
    return cfg


def parse_slo(text: str | None) -> SLO:
    if not text:
        return SLO()
    vals = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in ("ttft_ms", "tpot_ms", "e2el_ms"):
            raise KvsimError(f"--slo {text!r}: {part!r} is not one of ttft_ms=, tpot_ms=, e2el_ms=")
        try:
            vals[k] = float(v)
        except ValueError:
            raise KvsimError(f"--slo {text!r}: {k} value {v!r} is not a number") from None
    return SLO(**vals)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3.1-8b", help="shipped short name or path to a config.json")
    p.add_argument("--hardware", default="h100", help="GPU name (kvsim hardware list)")
    p.add_argument("--profile", default=None, help="profile JSON (default: a committed one matching model x hardware x TP, else roofline)")
    p.add_argument("--no-profile", action="store_true", help="use the roofline even when a profile exists")
    p.add_argument("--allow-profile-mismatch", action="store_true",
                   help="use --profile even if it was measured for another model, GPU or TP (warns)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format: kvsim | azure | mooncake (default: detected)")
    p.add_argument("--skip-invalid", action="store_true", help="reject malformed trace lines with a reason instead of stopping")
    p.add_argument("--slo", default=None, help="e.g. ttft_ms=2000,tpot_ms=100 (goodput counts requests meeting all)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate (divide arrival times)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    add_engine_args(p)


def _spec(args, method):
    from kvsim import api

    return api.make_spec(args.model, args.hardware, method, engine_config(args), args.profile,
                         parse_slo(args.slo), auto_profile=not args.no_profile,
                         allow_profile_mismatch=args.allow_profile_mismatch)


def cmd_replay(args) -> int:
    from kvsim import api
    from kvsim.metrics.summary import format_summary

    spec = _spec(args, args.method)
    res = api.replay(args.trace, spec=spec, out_dir=args.out, fmt=args.fmt, skip_invalid=args.skip_invalid,
                     progress=not args.quiet, rate_scale=args.rate_scale, limit=args.limit)
    print(format_summary(res.summary))
    print(f"  outputs: {args.out}/summary.json requests.csv timeline.csv timeline.png")
    return 0


def cmd_methods(args) -> int:
    from kvsim.methods.listing import format_methods

    print(format_methods())
    return 0


def cmd_trace(args) -> int:
    from kvsim.workload import readers, stats

    if args.trace_cmd == "stats":
        d = stats.trace_stats(readers.read_trace(args.file, args.fmt, skip_invalid=args.skip_invalid))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsim", description="What KV-cache compression does to serving throughput and latency.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("replay", help="replay a trace through the modelled engine", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("trace", help="trace file (kvsim JSONL, Azure CSV or Mooncake JSONL)")
    r.add_argument("--method", default="none", help="compression method, e.g. h2o:budget=512,window=32 (see `kvsim methods`)")
    r.add_argument("--out", default="out/replay", help="output directory")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_args(r)
    r.set_defaults(func=cmd_replay)

    m = sub.add_parser("methods", help="list compression methods, knobs and defaults")
    m.set_defaults(func=cmd_methods)

    t = sub.add_parser("trace", help="trace utilities")
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    ts = tsub.add_parser("stats", help="count, duration, rate and length percentiles")
    ts.add_argument("file")
    ts.add_argument("--format", dest="fmt", default=None)
    ts.add_argument("--skip-invalid", action="store_true")
    ts.add_argument("--json", action="store_true")
    tg = tsub.add_parser("gen", help="generate a synthetic trace (Poisson or Gamma arrivals)")
    tg.add_argument("--out", required=True)
    tg.add_argument("--num-requests", type=int, default=1000)
    tg.add_argument("--rate", type=float, default=1.0, help="requests per second")
    tg.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    tg.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times (gamma)")
    tg.add_argument("--lengths-csv", default=None, help="CSV with num_prefill_tokens,num_decode_tokens columns")
    tg.add_argument("--prompt-tokens", type=int, default=512)
    tg.add_argument("--output-tokens", type=int, default=128)
    tg.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_trace)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


#: modules that add their own subcommands with ``register(subparsers)``, imported only when the CLI starts
_EXTRA_MODULES = ["kvsim.compare", "kvsim.validate", "kvsim.cost.calibrate", "kvsim.plan"]


def _register_module(name: str):
    def add(sub):
        import importlib

        importlib.import_module(name).register(sub)

    return add


_EXTRA_COMMANDS: list = [_register_module(m) for m in _EXTRA_MODULES]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvsimError as e:
        print(f"kvsim: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as e:
        # a path the user gave that cannot be used as given: an input error like the others, not a crash
        print(f"kvsim: error: {e.filename}: {e.strerror}" if e.filename else f"kvsim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
