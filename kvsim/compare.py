"""``kvsim compare``: every method on the same trace and seed, one table (``kvsim bench``, the fixed-batch
figures, is :mod:`kvsim.bench`)."""

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
    spec_kw = {k: replay_kw.pop(k) for k in ("model", "hardware", "config", "profile", "slo", "auto_profile") if k in replay_kw}
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


def register(sub) -> None:
    from kvsim import cli

    c = sub.add_parser("compare", help="run several methods on the same trace and seed; one table and plots")
    c.add_argument("trace")
    c.add_argument("--methods", required=True, help="comma-separated specs, e.g. none,fp8,kivi:bits=2,h2o:budget=512")
    c.add_argument("--out", default="out/compare")
    c.add_argument("--quiet", action="store_true")
    cli.add_run_args(c)
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from kvsim import cli
    from kvsim.methods import parse_method_list

    methods = parse_method_list(args.methods)
    rows = compare(args.trace, methods, args.out, progress=not args.quiet, model=args.model, hardware=args.hardware,
                   config=cli.engine_config(args), profile=args.profile, slo=cli.parse_slo(args.slo),
                   auto_profile=not args.no_profile, fmt=args.fmt, skip_invalid=args.skip_invalid,
                   rate_scale=args.rate_scale, limit=args.limit)
    print(Path(args.out, "compare.md").read_text())
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png and one replay folder per method ({len(rows)})")
    return 0
