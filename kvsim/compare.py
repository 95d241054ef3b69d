"""``kvsim compare`` (every method on the same trace and seed, one table) and ``kvsim bench`` (a fixed
batch, the way kernel papers report prefill and decode throughput)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvsim.cost.base import StepShape
from kvsim.errors import ConfigError

COMPARE_COLUMNS = [
    "method", "completed", "rejected", "request_throughput", "output_throughput", "total_token_throughput",
    "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "e2el_ms_p50", "e2el_ms_p99", "goodput",
    "peak_batch_size", "mean_batch_size", "kv_bytes_per_token", "kv_bytes_saved_fraction", "kv_tokens_per_replica",
    "mean_output_length_change", "output_length_source", "num_preemptions", "prefix_cache_hit_rate", "cost_model",
]


def compare_row(s: dict) -> dict:
    row = {k: s.get(k) for k in COMPARE_COLUMNS if k in s}
    row["method"] = s["method"]
    for m in ("ttft_ms", "tpot_ms", "e2el_ms"):
        row[f"{m}_p50"] = s[m]["median"]
        row[f"{m}_p99"] = s[m]["p99"]
    return row


def compare(trace, methods, out_dir, progress: bool = True, **replay_kw) -> list[dict]:
    from kvsim import api
    from kvsim.methods import parse_method

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_kw = {k: replay_kw.pop(k) for k in ("model", "hardware", "config", "profile", "slo", "auto_profile",
                                            "allow_profile_mismatch") if k in replay_kw}
    rows = []
    for m in methods:
        meth = parse_method(m) if not hasattr(m, "spec_string") else m
        spec = api.make_spec(method=meth, **spec_kw)
        sub = out / _slug(spec.method.spec_string())
        res = api.replay(trace, spec=spec, out_dir=sub, progress=progress, **replay_kw)
        rows.append(compare_row(res.summary))
    write_table(rows, out / "compare.csv", out / "compare.md")
    plot_compare(rows, out / "compare.png")
    return rows


def _slug(spec: str) -> str:
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COMPARE_COLUMNS})
    cols = ["method", "request_throughput", "output_throughput", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
            "tpot_ms_p99", "e2el_ms_p50", "e2el_ms_p99", "goodput", "peak_batch_size", "kv_bytes_per_token",
            "mean_output_length_change"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")


def plot_compare(rows: list[dict], png: Path) -> None:
    from kvsim.metrics.plots import _plt

    plt = _plt()
    names = [r["method"].split(":")[0] if len(r["method"]) > 22 else r["method"] for r in rows]
    panels = [("output_throughput", "output tok/s"), ("ttft_ms_p99", "p99 TTFT (ms)"),
              ("tpot_ms_p50", "p50 TPOT (ms)"), ("e2el_ms_p99", "p99 E2EL (ms)"),
              ("peak_batch_size", "peak batch"), ("kv_bytes_per_token", "KV bytes/token")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (k, label) in zip(axes.flat, panels):
        ax.bar(range(len(rows)), [r.get(k) or 0 for r in rows], color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def bench(model="llama-3.1-8b", hardware="h100", method="none", batch_size=8, prompt_len=1024, output_len=128,
          config=None, profile=None, auto_profile=True) -> dict:
    """Fixed batch: B identical requests, the whole prompt in one prefill step, then N-1 decode steps
    (the prefill step samples the first token). Throughputs as kernel papers define them."""
    from kvsim import api
    from kvsim.engine.memory import num_kv_blocks

    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("output_len", output_len)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"bench: {name}={v!r} must be a positive integer")
    spec = api.make_spec(model, hardware, method, config, profile, auto_profile=auto_profile)
    cost = api.make_cost(spec)
    meth = spec.method
    blocks = num_kv_blocks(spec.model, spec.hardware, spec.config, meth)
    bs = spec.config.block_size
    from kvsim.engine.block_manager import BlockManager
    from kvsim.engine.kv_cache_manager import KVCacheManager

    kv = KVCacheManager(BlockManager(max(1, blocks), bs), meth, spec.model, spec.config.tensor_parallel_size)
    need = batch_size * kv.lifetime_blocks(prompt_len, prompt_len + output_len - 1)
    result = {"model": spec.model.name, "hardware": spec.hardware.name, "method": meth.spec_string(),
              "cost_model": cost.name, "batch_size": batch_size, "prompt_len": prompt_len, "output_len": output_len,
              "kv_blocks_needed": need, "kv_blocks_available": blocks, "oom": need > blocks}
    prefill_s = cost.step_time_s(StepShape(0, 0, [(prompt_len, prompt_len, True)] * batch_size))
    decode_times = []
    for i in range(1, output_len):
        ctx = prompt_len + i  # tokens computed after this step: prompt + i generated
        kept = meth.kept_tokens(prompt_len, ctx)
        decode_times.append(cost.decode_step_time_s(batch_size, batch_size * kept))
    mean_decode = sum(decode_times) / len(decode_times) if decode_times else 0.0
    result.update({
        "prefill_time_s": prefill_s,
        "mean_decode_step_s": mean_decode,
        "prefill_throughput": batch_size * prompt_len / prefill_s,
        "decode_throughput": batch_size / mean_decode if mean_decode else None,
        "total_time_s": prefill_s + sum(decode_times),
    })
    return result


def register(sub) -> None:
    from kvsim import cli

    c = sub.add_parser("compare", help="run several methods on the same trace and seed; one table and plots")
    c.add_argument("trace")
    c.add_argument("--methods", required=True, help="comma-separated specs, e.g. none,fp8,kivi:bits=2,h2o:budget=512")
    c.add_argument("--out", default="out/compare")
    c.add_argument("--quiet", action="store_true")
    cli.add_run_args(c)
    c.set_defaults(func=_cmd_compare)

    b = sub.add_parser("bench", help="fixed-batch prefill and decode throughput (kernel-paper style)")
    b.add_argument("--model", default="llama-3.1-8b")
    b.add_argument("--hardware", default="h100")
    b.add_argument("--method", default="none")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--prompt-len", type=int, default=1024)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--profile", default=None)
    b.add_argument("--no-profile", action="store_true")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    cli.add_engine_args(b)
    b.set_defaults(func=_cmd_bench)


def _cmd_compare(args) -> int:
    from kvsim import cli
    from kvsim.methods import parse_method_list

    methods = parse_method_list(args.methods)
    rows = compare(args.trace, methods, args.out, progress=not args.quiet, model=args.model, hardware=args.hardware,
                   config=cli.engine_config(args), profile=args.profile, slo=cli.parse_slo(args.slo),
                   auto_profile=not args.no_profile, fmt=args.fmt, skip_invalid=args.skip_invalid,
                   rate_scale=args.rate_scale, limit=args.limit, allow_profile_mismatch=args.allow_profile_mismatch)
    print(Path(args.out, "compare.md").read_text())
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png and one replay folder per method ({len(rows)})")
    return 0


def _cmd_bench(args) -> int:
    from kvsim import cli

    r = bench(args.model, args.hardware, args.method, args.batch_size, args.prompt_len, args.output_len,
              cli.engine_config(args), args.profile, auto_profile=not args.no_profile)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} / {r['hardware']} / {r['method']}  ({r['cost_model']})  B={r['batch_size']} L={r['prompt_len']} N={r['output_len']}"
              + ("  [OOM: KV does not fit]" if r["oom"] else ""))
        print(f"  prefill_throughput {r['prefill_throughput']:.1f} tok/s  (prefill step {1e3 * r['prefill_time_s']:.2f} ms)")
        if r["decode_throughput"]:
            print(f"  decode_throughput  {r['decode_throughput']:.1f} tok/s  (mean decode step {1e3 * r['mean_decode_step_s']:.3f} ms)")
    return 0
