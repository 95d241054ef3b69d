"""Plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(timeline_csv: Path, out_png: Path, title: str = "", max_points: int = 5000,
                  links_csv: Path | None = None) -> None:
    """Batch size, KV blocks used and queue length per replica over time; with ``links_csv`` (a run that moves
    KV over links: P/D, CPU tier) a fourth panel with each link's utilisation."""
    rows = list(csv.DictReader(open(timeline_csv)))
    plt = _plt()
    fig, axes = plt.subplots(4 if links_csv else 3, 1, figsize=(9, 9 if links_csv else 7), sharex=True)
    by_rep: dict[str, list] = {}
    for r in rows:
        by_rep.setdefault(r["replica"], []).append(r)
    for rep, rs in sorted(by_rep.items()):
        step = max(1, len(rs) // max_points)
        rs = rs[::step]
        t = [float(r["time_s"]) for r in rs]
        label = f"replica {rep}" if len(by_rep) > 1 else None
        axes[0].plot(t, [int(r["batch_size"]) for r in rs], lw=0.8, label=label)
        axes[1].plot(t, [100 * int(r["kv_blocks_used"]) / max(1, int(r["kv_blocks_total"])) for r in rs], lw=0.8)
        axes[2].plot(t, [int(r["num_waiting"]) for r in rs], lw=0.8)
    axes[0].set_ylabel("batch size")
    axes[1].set_ylabel("KV blocks used (%)")
    axes[2].set_ylabel("waiting requests")
    if links_csv:
        by_link: dict[str, list] = {}
        for r in csv.DictReader(open(links_csv)):
            by_link.setdefault(r["link"], []).append((float(r["time_s"]), 100 * float(r["utilization"])))
        for name, pts in sorted(by_link.items()):
            axes[3].step([p[0] for p in pts], [p[1] for p in pts], where="post", lw=0.8, label=name)
        axes[3].set_ylabel("link busy (%)")
        if by_link:
            axes[3].legend(fontsize=7)
    axes[-1].set_xlabel("simulated time (s)")
    if len(by_rep) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def method_ratio_plots(result: dict, out: Path) -> list[Path]:
    """Measured vs kvsim method / FP16 throughput ratios (kvsim.cost.method_fit), one figure per model:
    a row per method, columns prefill and decode against prompt length (batch 1) and against batch size
    (prompt 1024). Measured: points; kvsim fitted on the other model only: solid line; on both: dashed."""
    from dataclasses import replace

    from kvsim.cost import method_fit as mf
    from kvsim.methods.impl import trial_terms

    plt = _plt()
    rows = result["rows"]
    methods = [m for m in mf.SEED_METHODS if m != "None-16" and any(r["method"] == m for r in rows)]
    panels = [("prefill", "prompt_len", 1), ("prefill", "batch_size", 1024),
              ("decoding", "prompt_len", 1), ("decoding", "batch_size", 1024)]
    written = []
    for model in sorted({r["model"] for r in rows}):
        fold = result["folds"].get(model)
        fig, axes = plt.subplots(len(methods), 4, figsize=(15, 2.6 * len(methods)), squeeze=False)
        for i, meth in enumerate(methods):
            key = next(k for k, spec in mf.IMPL_TERMS.items() if spec.label == meth)
            fits = [("fit on both models", "--", result["params"], result["terms"])]
            if fold and key in fold["terms"]:
                fits.insert(0, (f"method terms fitted on {'+'.join(fold['fit_on'])} only", "-", result["params"],
                                {**result["terms"], key: fold["terms"][key]}))
            for j, (stage, axis, fixed) in enumerate(panels):
                ax = axes[i][j]
                other = "batch_size" if axis == "prompt_len" else "prompt_len"
                pts = sorted((r[axis], r["measured_ratio"]) for r in rows
                             if r["model"] == model and r["method"] == meth and r["stage"] == stage
                             and r["measured_ratio"] is not None
                             and (r[other] == fixed or (other == "prompt_len" and stage == "decoding"
                                                        and fixed - 64 <= r[other] <= fixed + 65)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="black", ms=4, label="measured")
                xs = ([128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096] if axis == "prompt_len"
                      else [1, 2, 3, 4, 6, 8, 12, 16])
                for label, style, params, terms in fits:
                    pred = mf.Predictor(params)
                    ys = []
                    with trial_terms(terms):
                        for x in xs:
                            b, p = (fixed, x) if axis == "prompt_len" else (x, fixed)
                            pt = mf.Point(model, meth, stage, b, p, 0.0)
                            ys.append(pred.throughput(pt) / pred.throughput(replace(pt, label="None-16")))
                    ax.plot(xs, ys, style, color="tab:blue", lw=1.2, label=f"kvsim, {label}")
                ax.axhline(1.0, color="grey", lw=0.6)
                ax.set_xscale("log", base=2)
                # at least 0.85-1.15 shown, so a 1 % wiggle does not look like a trend
                lo, hi = ax.get_ylim()
                ax.set_ylim(min(lo, 0.85), max(hi, 1.15))
                ax.set_title(f"{meth} {stage} vs {axis.replace('_', ' ')}"
                             f" ({'batch 1' if axis == 'prompt_len' else 'prompt 1024'})"
                             + ("" if pts else ": not measured"), fontsize=8)
                ax.tick_params(labelsize=7)
                if j == 0:
                    ax.legend(fontsize=6)
                if j == 0:
                    ax.set_ylabel("method / FP16 throughput", fontsize=7)
        fig.suptitle(f"{model}: LMDeploy 0.6, 48 GB Ampere card (seed paper data) vs kvsim", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"ratios_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
