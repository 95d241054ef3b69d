"""``kvsim compare``: every method on the same trace and seed, one table (``kvsim bench``, the fixed-batch
figures, is :mod:`kvsim.bench`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


COMPARE_COLUMNS = [
    "method", "completed", "rejected", "request_throughput", "output_throughput", "total_token_throughput",
    "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "e2el_ms_p50", "e2el_ms_p99", "goodput",
    "peak_batch_size", "mean_batch_size", "kv_bytes_per_token", "kv_bytes_saved_fraction", "kv_tokens_per_replica",
    "mean_output_length_change", "output_length_source", "output_length_source_kind", "num_output_length_capped",
    "kv_bytes_saved_fraction_peak", "num_preemptions", "prefix_cache_hit_rate", "cost_model",
]


def compare_row(s: dict) -> dict:
    row = {k: s.get(k) for k in COMPARE_COLUMNS if k in s}
    row["method"] = s["method"]
    for m in ("ttft_ms", "tpot_ms", "e2el_ms"):
        row[f"{m}_p50"] = s[m]["median"]
        row[f"{m}_p99"] = s[m]["p99"]
    return row


def compare(trace, methods, out_dir, progress: bool = True, **replay_kw) -> list[dict]:
    from kvsim.build import make_spec
    from kvsim.methods import parse_method
    from kvsim.replay import replay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_kw = {k: replay_kw.pop(k) for k in ("model", "hardware", "config", "profile", "slo", "auto_profile", "lengths",
                                            "allow_profile_mismatch", "engine", "transfer") if k in replay_kw}
    rows = []
    specs = [make_spec(method=parse_method(m) if not hasattr(m, "spec_string") else m, **spec_kw) for m in methods]
    for i, spec in enumerate(specs, 1):
        sub = out / _slug(spec.method.spec_string())
        # one bar per method, named by it: "compare 2/5 kivi:bits=2"
        desc = f"compare {i}/{len(specs)} {short_label(spec.method)}" if progress else False
        res = replay(trace, spec=spec, out_dir=sub, progress=desc, **replay_kw)
        rows.append(compare_row(res.summary))
    write_table(rows, out / "compare.csv", out / "compare.md")
    plot_compare(rows, out / "compare.png")
    return rows


def _slug(spec: str) -> str:
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def short_label(method) -> str:
    """A method's name with the knobs that differ from its defaults (``kivi:bits=2`` -> ``kivi``,
    ``h2o:budget=512,window=32`` -> ``h2o:budget=512``): distinct for distinct settings, short for plots."""
    from kvsim.methods import parse_method

    m = parse_method(method) if not hasattr(method, "spec_string") else method
    default = type(m)()
    diff = [f"{k}={getattr(m, k)}" for k in type(m).knobs() if getattr(m, k) != getattr(default, k)]
    return m.name + (":" + ",".join(diff) if diff else "")


#: compare.md columns: (key, header, kind); kinds: "int", "num" (plain, thousands separated), "pct"
MD_COLUMNS = [
    ("method", "method", "text"), ("request_throughput", "req/s", "num"), ("output_throughput", "output tok/s", "num"),
    ("ttft_ms_p50", "TTFT p50 ms", "num"), ("ttft_ms_p99", "TTFT p99 ms", "num"), ("tpot_ms_p50", "TPOT p50 ms", "num"),
    ("tpot_ms_p99", "TPOT p99 ms", "num"), ("e2el_ms_p50", "E2EL p50 ms", "num"), ("e2el_ms_p99", "E2EL p99 ms", "num"),
    ("goodput", "goodput req/s", "num"), ("peak_batch_size", "peak batch", "int"),
    ("kv_bytes_per_token", "KV B/token", "int"), ("kv_bytes_saved_fraction", "KV saved", "pct"),
    ("mean_output_length_change", "output length", "signed_pct"), ("output_length_source_kind", "length source", "text"),
]


def _fmt(v, kind: str = "num") -> str:
    """Plain numbers for people: thousands separators, 3 significant digits below 100 (never 1.116e+04)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "text" or isinstance(v, str):
        return str(v)
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "signed_pct":
        return f"{100 * v:+.1f} %"
    if kind == "int" or (isinstance(v, int) and not isinstance(v, bool)):
        return f"{round(v):,}"
    a = abs(v)
    if a >= 100 or a == 0:
        return f"{v:,.0f}"
    return f"{v:,.{max(0, 2 - int(math.floor(math.log10(a))))}f}"


def write_table(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COMPARE_COLUMNS})
    lines = ["| " + " | ".join(h for _, h, _ in MD_COLUMNS) + " |",
             "|" + "|".join("---" if kind == "text" else "---:" for _, _, kind in MD_COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), kind) for k, _, kind in MD_COLUMNS) + " |")
    md_path.write_text("\n".join(lines) + "\n")


def plot_compare(rows: list[dict], png: Path) -> None:
    from kvsim.metrics.plots import pyplot

    plt = pyplot()
    names = [short_label(r["method"]) for r in rows]
    panels = [("output_throughput", "output tok/s"), ("ttft_ms_p99", "p99 TTFT (ms)"),
              ("tpot_ms_p50", "p50 TPOT (ms)"), ("e2el_ms_p99", "p99 E2EL (ms)"),
              ("peak_batch_size", "peak batch"), ("kv_bytes_saved_fraction", "KV bytes saved (time-averaged)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (k, label) in zip(axes.flat, panels):
        ax.bar(range(len(rows)), [r.get(k) or 0 for r in rows], color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
