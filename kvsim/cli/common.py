"""What every kvsim command's parser shares: one help style, the run arguments, the engine options (made
from :class:`kvsim.config.EngineConfig`'s field metadata, so a new engine option is a flag without any
edit here), ``--config`` files, and turning parsed arguments into a spec."""

from __future__ import annotations

import argparse
import dataclasses

from kvsim.config import FIELDS, EngineConfig, config_from_mapping, load_run_file
from kvsim.errors import ConfigError
from kvsim.metrics.slo import SLO, parse_goodput_slo

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


def _flag_type(f: dataclasses.Field):
    """bool, int, float or str: what a field's annotation (a string under postponed evaluation) names."""
    t = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.split("|")[0].strip() == name:
            return typ
    return str


def _default_text(f: dataclasses.Field, help_text: str) -> str:
    if "default" in help_text or f.default is None:
        return help_text
    if isinstance(f.default, bool):
        return f"{help_text} (default: {'on' if f.default else 'off'})"
    return f"{help_text} (default: {f.default})"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--dtype`` and one flag per EngineConfig field (its metadata: help, group, choices)."""
    groups = {"vllm": p.add_argument_group("engine options (vLLM names; defaults as vLLM V1 v0.19)"),
              "kvsim": p.add_argument_group("cluster and scheduling (kvsim)")}
    g = groups["vllm"]
    g.add_argument("--config", help="YAML file of engine options (vLLM names) and model, hardware, method, dtype; "
                                    "flags given here override it, any other key is an error")
    g.add_argument("--dtype", default=None, help="weights dtype as vLLM's --dtype: auto (the checkpoint's), "
                                                 "bfloat16, float16 (default: auto)")
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        group = groups[meta.get("group", "vllm")]
        flag = "--" + f.name.replace("_", "-")
        text = _default_text(f, meta.get("help", ""))
        typ = _flag_type(f)
        if typ is bool:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
            group.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_false",
                               help=f"turn {meta.get('short', f.name)} off")
            for alias in meta.get("hidden_aliases", ()):
                group.add_argument(alias, dest=f.name, action="store_true", help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=None, choices=meta.get("choices"), help=text)


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
    """``--slo`` of a replay: per-request goodput limits, in the SLO grammar of kvsim.metrics.slo."""
    return parse_goodput_slo(text) if text else SLO()


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
                        "model (kvsim/profiles/lengths/), else the method's published figure; published = always the "
                        "published figure; trace = the trace's lengths unchanged; PROFILE = this kvprof lengths file, "
                        "for any model. Lengths are cut at max_tokens and max_model_len (default: auto)")
    p.add_argument("--allow-profile-mismatch", action="store_true",
                   help="use --profile even if it was measured for another model, GPU or TP (warns)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format: kvsim | azure | mooncake (default: detected)")
    p.add_argument("--skip-invalid", action="store_true", help="reject malformed trace lines with a reason instead of stopping")
    p.add_argument("--slo", default=None, help="SLO terms metric[:stat]=limit, e.g. ttft_ms=2000,tpot_ms=100: goodput "
                   "counts the requests within every limit (the grammar of kvsim plan; see kvsim.metrics.slo)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate (divide arrival times)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--result-format", choices=["kvsim", "vllm"], default="kvsim",
                   help="vllm: also write result_vllm.json with the flat keys of vLLM's benchmark_serving result "
                        "(mean_ttft_ms, p99_itl_ms, request_throughput, ...) beside summary.json")
    add_engine_args(p)
    add_transfer_args(p)


def add_transfer_args(p) -> None:
    """The flags of kvsim.transfer.TransferConfig (P/D disaggregation, CPU KV tier), one group."""
    from kvsim.transfer import SIDE_ROUTERS, TRANSFER_MODES

    g = p.add_argument_group("disaggregated prefill/decode and CPU KV tier (off by default; docs/disaggregation.md)")
    g.add_argument("--num-prefill-instances", metavar="N", dest="num_prefill_instances", type=int, default=None,
                   help="prefill instances of a disaggregated cluster (with --num-decode-instances; default: 0, co-located)")
    g.add_argument("--num-decode-instances", metavar="N", dest="num_decode_instances", type=int, default=None,
                   help="decode instances of a disaggregated cluster")
    g.add_argument("--prefill-tensor-parallel-size", metavar="TP", dest="prefill_tensor_parallel_size", type=int, default=None,
                   help="GPUs per prefill instance (default: --tensor-parallel-size)")
    g.add_argument("--decode-tensor-parallel-size", metavar="TP", dest="decode_tensor_parallel_size", type=int, default=None,
                   help="GPUs per decode instance (default: --tensor-parallel-size)")
    g.add_argument("--kv-transfer-link", metavar="NAME", dest="kv_transfer_link", default=None,
                   help="prefill -> decode link, one per GPU: nvlink-3, nvlink-4, pcie-gen4-x16, pcie-gen5-x16, "
                        "rdma-100g, rdma-200g, rdma-400g, infinite (default: rdma-400g)")
    g.add_argument("--kv-transfer-latency-us", metavar="US", dest="kv_transfer_latency_us", type=float, default=None,
                   help="override the link's per-transfer latency (microseconds)")
    g.add_argument("--kv-transfer-mode", dest="kv_transfer_mode", choices=TRANSFER_MODES, default=None,
                   help="whole: the decode instance pulls the cache after prefill (vLLM NixlConnector, default); "
                        "layerwise: pushed layer by layer during the last prefill step")
    g.add_argument("--prefill-router", dest="prefill_router", choices=SIDE_ROUTERS, default=None,
                   help="how a request picks its prefill instance (default: least-outstanding-tokens)")
    g.add_argument("--decode-router", dest="decode_router", choices=SIDE_ROUTERS, default=None,
                   help="how a request picks its decode instance (default: least-outstanding-tokens)")
    g.add_argument("--kv-offloading-size", "--kv-offload-gib", metavar="GIB", dest="kv_offloading_size", type=float, default=None,
                   help="CPU KV tier: GiB of host memory per instance (vLLM's --kv-offloading-size; default: no tier)")
    g.add_argument("--kv-offload-link", metavar="NAME", dest="kv_offload_link", default=None,
                   help="GPU <-> host link of the CPU tier (default: the GPU's own PCIe, specs/data/links.yaml)")
    g.add_argument("--kv-offload-latency-us", metavar="US", dest="kv_offload_latency_us", type=float, default=None,
                   help="override the host link's per-transfer latency (microseconds)")


def transfer_config(args):
    """The options given on the command line (or by the --config file, already applied to ``args``)."""
    from kvsim.transfer import FIELDS, transfer_from_mapping

    vals = {k: getattr(args, k, None) for k in FIELDS}
    return transfer_from_mapping({k: v for k, v in vals.items() if v is not None}, source="command line / --config file")


def spec_from_args(args, method):
    """The RunSpec a replay-like command's arguments describe."""
    from kvsim.build import make_spec

    return make_spec(model_arg(args), args.hardware, method, engine_config(args), args.profile,
                     parse_slo(args.slo), auto_profile=not args.no_profile, lengths=args.lengths,
                     allow_profile_mismatch=args.allow_profile_mismatch, engine=args.engine,
                     transfer=transfer_config(args))


def add_trace_command(sub, name: str, help: str, func, out_default: str, out_help: str,
                      quiet_help: str = "no progress bar") -> argparse.ArgumentParser:
    """A command that replays a trace (``replay``, ``compare``): the trace, ``--out``, ``--quiet`` and the
    run arguments; the caller adds its method argument."""
    p = sub.add_parser(name, help=help)
    add_trace_arg(p)
    p.add_argument("--out", default=out_default, help=out_help)
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    add_run_args(p)
    p.set_defaults(func=func)
    return p


#: the positional trace argument, one style for every command that reads a trace
TRACE_HELP = "trace file: kvsim JSONL, Azure CSV or Mooncake JSONL, optionally .gz (format detected, or --format)"


def add_trace_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("trace", nargs="?" if optional else None, help=TRACE_HELP)
