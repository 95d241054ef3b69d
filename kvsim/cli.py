"""``kvsim`` command line: argument parsing only; the work is in :mod:`kvsim.api`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsim.config import FIELDS, RUN_KEYS, EngineConfig, config_from_mapping, load_run_file
from kvsim.errors import ConfigError, KvsimError
from kvsim.metrics.collector import SLO

ENGINE_FLAGS = [
    ("tensor_parallel_size", int, "GPUs per replica (weights and KV split, all-reduce per layer) (default: 1)"),
    ("data_parallel_size", int, "engine ranks per replica group, each with its own scheduler and KV cache (default: 1)"),
    ("max_num_seqs", int, "most sequences in one step (default: vLLM V1's, by GPU memory: 1024 on >= 70 GiB, else 256)"),
    ("max_num_batched_tokens", int, "token budget per step (default: vLLM V1's, by GPU memory: 8192 on >= 70 GiB, else 2048)"),
    ("max_model_len", int, "context limit (default: the model's max_position_embeddings)"),
    ("block_size", int, "tokens per KV block (default: 16)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory vLLM may use (default: 0.9)"),
    ("kv_cache_dtype", str, "auto | fp8 (fp8 implies --method fp8) (default: auto)"),
    ("num_gpu_blocks_override", int, "pin the KV block count per replica (default: sized from memory)"),
    ("seed", int, "seed for sampled output lengths (default: 0)"),
]
#: run keys' defaults when neither a flag nor the --config file gives them
RUN_DEFAULTS = {"model": "llama-3.1-8b", "hardware": "h100", "method": "none", "methods": None, "dtype": "auto"}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where the help does not already say it and there is a default to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, argparse._StoreConstAction)):
            return text
        return f"{text} (default: {d})"


class Parser(argparse.ArgumentParser):
    """Every kvsim (sub)command parser: one help style."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine options (vLLM names; defaults as vLLM V1 v0.19)")
    g.add_argument("--config", help="YAML file of engine options (vLLM names) and model, hardware, method, dtype; "
                                    "flags given here override it, any other key is an error")
    g.add_argument("--dtype", default=None, help="weights dtype as vLLM's --dtype: auto (the checkpoint's), "
                                                 "bfloat16, float16 (default: auto)")
    for name, typ, text in ENGINE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    g.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true", default=None,
                   help="split MoE experts across the data-parallel ranks")
    for name, text in (("enable_chunked_prefill", "chunked prefill (default: on)"),
                       ("enable_prefix_caching", "automatic prefix caching from prefix_hashes (default: on)")):
        flag = name.replace("_", "-")
        g.add_argument(f"--{flag}", dest=name, action="store_true", default=None, help=text)
        g.add_argument(f"--no-{flag}", dest=name, action="store_false", help=f"turn {text.split(' (')[0]} off")
    g.add_argument("--prefix-caching", dest="enable_prefix_caching", action="store_true", help=argparse.SUPPRESS)
    k = p.add_argument_group("cluster and scheduling (kvsim)")
    k.add_argument("--num-replicas", dest="num_replicas", type=int, default=None, help="independent replicas (default: 1)")
    k.add_argument("--router", choices=["round-robin", "least-outstanding-tokens", "vllm-dp"], default=None,
                   help="how a request picks a replica: least-outstanding-tokens (default), round-robin, or vllm-dp "
                        "(vLLM 0.19's DP balancer, lowest 4 x waiting + running)")
    k.add_argument("--scheduler", choices=["chunked", "prefill-first"], default=None,
                   help="chunked: vLLM V1 (default); prefill-first: vLLM V0 without chunked prefill")


def apply_config_file(args) -> None:
    """Fill the run keys (model, hardware, method, dtype) a flag did not give from the ``--config`` file,
    then from RUN_DEFAULTS; keep the file's engine options for :func:`engine_config`. A key the command
    has no use for is refused, never dropped."""
    base, run = EngineConfig(), {}
    args.engine_base = base
    if not hasattr(args, "config"):
        return  # a command without engine options (validate, methods, ...) keeps its own defaults
    if args.config:
        base, run = load_run_file(args.config)
    args.engine_base = base
    for key, value in run.items():
        attr = key
        if key == "method" and (args.cmd == "bench" or not hasattr(args, "method")) and isinstance(value, list):
            # commands that take several methods (compare, plan: --methods; bench: --method a,b) get them joined
            from kvsim.methods import parse_method

            attr = "method" if hasattr(args, "method") else "methods"
            value = ",".join(parse_method(v).spec_string() for v in value)
        elif key == "method" and not hasattr(args, "method") and hasattr(args, "methods"):
            attr = "methods"
            items = value if isinstance(value, list) else [value]
            from kvsim.methods import parse_method

            value = ",".join(parse_method(v).spec_string() for v in items)
        elif key == "method" and isinstance(value, list):
            raise ConfigError(f"{args.config}: key 'method': kvsim {args.cmd} runs one method, got a list {value!r}")
        if not hasattr(args, attr):
            raise ConfigError(f"{args.config}: key {key!r}: kvsim {args.cmd} has no use for it (value {value!r})")
        if getattr(args, attr) is None:
            setattr(args, attr, value)
    fill = getattr(args, "fill_run_keys", None)  # a command's own file of run keys (bench --grid) comes next
    if fill is not None:
        fill(args)
    for key, default in RUN_DEFAULTS.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, default)


def engine_config(args) -> EngineConfig:
    base = getattr(args, "engine_base", None)
    if base is None:
        apply_config_file(args)
        base = args.engine_base
    flags = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    cfg, _ = config_from_mapping(flags, source="command line", base=base)
    return cfg


def model_arg(args):
    """--model with --dtype applied: the name (dtype auto) or a ModelSpec."""
    dtype = getattr(args, "dtype", None)
    if dtype in (None, "auto"):
        return args.model
    from kvsim.specs.model import apply_dtype, load_model

    return apply_dtype(load_model(args.model), dtype, source="--dtype" if not getattr(args, "config", None)
                       else f"--dtype / {args.config}")


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
    p.add_argument("--model", default=None, help="shipped short name, Hugging Face id of one, or path to a "
                   "config.json (`kvsim models`) (default: llama-3.1-8b)")
    p.add_argument("--hardware", default=None, help="GPU name (`kvsim hardware`) (default: h100)")
    p.add_argument("--profile", default=None, help="profile JSON (default: a committed one matching model x hardware x TP, else roofline)")
    p.add_argument("--no-profile", action="store_true", help="use the roofline even when a profile exists")
    p.add_argument("--engine", default=None, help="serving engine whose step model to use: vllm (kvsim's default "
                   "calibration) or a fitted one such as lmdeploy-0.6 (docs/method-costs.md) (default: vllm)")
    p.add_argument("--lengths", default="auto", metavar="auto|published|trace|PROFILE",
                   help="output-length source under compression: auto = a kvprof lengths measurement made on this "
                        "model (profiles/lengths/), else the method's published figure; published = always the "
                        "published figure; trace = the trace's lengths unchanged; PROFILE = this kvprof lengths file, "
                        "for any model. Lengths are cut at max_tokens and max_model_len (default: auto)")
    p.add_argument("--allow-profile-mismatch", action="store_true",
                   help="use --profile even if it was measured for another model, GPU or TP (warns)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format: kvsim | azure | mooncake (default: detected)")
    p.add_argument("--skip-invalid", action="store_true", help="reject malformed trace lines with a reason instead of stopping")
    p.add_argument("--slo", default=None, help="e.g. ttft_ms=2000,tpot_ms=100 (goodput counts requests meeting all)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate (divide arrival times)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--result-format", choices=["kvsim", "vllm"], default="kvsim",
                   help="vllm: also write result_vllm.json with the flat keys of vLLM's benchmark_serving result "
                        "(mean_ttft_ms, p99_itl_ms, request_throughput, ...) beside summary.json")
    add_engine_args(p)
    from kvsim.transfer import add_transfer_args

    add_transfer_args(p)


def _spec(args, method):
    from kvsim import api

    from kvsim.transfer import transfer_config

    return api.make_spec(model_arg(args), args.hardware, method, engine_config(args), args.profile,
                         parse_slo(args.slo), auto_profile=not args.no_profile, lengths=args.lengths,
                         allow_profile_mismatch=args.allow_profile_mismatch, engine=args.engine,
                         transfer=transfer_config(args))


def cmd_replay(args) -> int:
    from kvsim import api
    from kvsim.metrics.summary import format_summary

    spec = _spec(args, args.method)
    res = api.replay(args.trace, spec=spec, out_dir=args.out, fmt=args.fmt, skip_invalid=args.skip_invalid,
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


def cmd_methods(args) -> int:
    from kvsim.methods.listing import format_methods

    print(format_methods(model=args.model, lengths=args.lengths), end="")
    return 0


def cmd_models(args) -> int:
    from kvsim.specs.listing import format_model, format_models

    print(format_model(args.name) if args.name else format_models(), end="")
    return 0


def cmd_hardware(args) -> int:
    from kvsim.specs.listing import format_hardware, format_hardware_one

    print(format_hardware_one(args.name) if args.name else format_hardware(), end="")
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


#: the positional trace argument, one style for every command that reads a trace
TRACE_HELP = "trace file: kvsim JSONL, Azure CSV or Mooncake JSONL, optionally .gz (format detected, or --format)"


def add_trace_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("trace", nargs="?" if optional else None, help=TRACE_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="kvsim", description="What KV-cache compression does to serving throughput and latency.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="COMMAND")

    r = sub.add_parser("replay", help="replay a trace through the modelled engine")
    add_trace_arg(r)
    r.add_argument("--method", default=None, help="compression method, e.g. h2o:budget=512,window=32 (`kvsim methods`) "
                                                  "(default: none)")
    r.add_argument("--out", default="out/replay", help="output directory")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_args(r)
    r.set_defaults(func=cmd_replay)

    m = sub.add_parser("methods", help="list compression methods, knobs, defaults and output-length sources")
    m.add_argument("--model", default=None, help="also say which output-length source a replay of this model uses")
    m.add_argument("--lengths", default="auto", metavar="auto|published|trace|PROFILE",
                   help="with --model: the --lengths choice to resolve")
    m.set_defaults(func=cmd_methods)

    mo = sub.add_parser("models", help="list the shipped models (shape, KV bytes per token, Hugging Face source)")
    mo.add_argument("name", nargs="?", help="one model (short name or Hugging Face id): every field and its source")
    mo.set_defaults(func=cmd_models)
    hw = sub.add_parser("hardware", help="list the known GPUs and their datasheet figures")
    hw.add_argument("name", nargs="?", help="one GPU: every figure with its source")
    hw.set_defaults(func=cmd_hardware)

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

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


#: modules that add their own subcommands with ``register(subparsers)``, imported only when the CLI starts
_EXTRA_MODULES = ["kvsim.compare", "kvsim.bench", "kvsim.validate", "kvsim.cost.calibrate", "kvsim.cost.method_fit", "kvsim.plan"]


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
        apply_config_file(args)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except KvsimError as e:
        print(f"kvsim: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as e:
        # a path the user gave that cannot be used as given: an input error like the others, not a crash
        print(f"kvsim: error: {e.filename}: {e.strerror}" if e.filename else f"kvsim: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `kvsim ... | head`: the reader left; say nothing more (Python's recipe: stdout to devnull so the
        # interpreter's final flush does not fail again)
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass  # no real file descriptor behind stdout: nothing left to flush at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
