"""Plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(timeline_csv: Path, out_png: Path, title: str = "", max_points: int = 5000,
                  links_csv: Path | None = None) -> None:
    """Batch size, KV blocks used and queue length per replica over time; with ``links_csv`` (a run that moves
    KV over links: P/D, CPU tier) a fourth panel with each link's utilisation."""
    rows = list(csv.DictReader(open(timeline_csv)))
    plt = pyplot()
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
