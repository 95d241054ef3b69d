"""What ``kvsim calibrate`` writes: calibration.yaml (the form kvsim reads), operator errors, per-hardware
summaries (CSV, markdown), the fitted parameters and a plot; and the mixed-attention check's table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from kvsim.cost.calibrate.data import LSS_ATTENTION
from kvsim.cost.calibrate.model import A_PRIORI, NAMES, SKEW, predict
from kvsim.cost.roofline import RooflineCost, RooflineParams
from kvsim.resources import shared_dir


def _round(p: RooflineParams) -> dict:
    out = {}
    for n in NAMES + list(SKEW.values()) + list(A_PRIORI):
        v = getattr(p, n)
        if v is None:
            continue
        out[n] = float(f"{v:.4g}")
    return out


def yaml_number(v: float) -> str:
    """A float YAML 1.1 reads back as a float (PyYAML wants a dot in the mantissa: 1.0e-05, not 1e-05)."""
    s = repr(float(f"{v:.4g}"))
    if "e" in s and "." not in s.split("e")[0]:
        m, e = s.split("e")
        s = f"{m}.0e{e}"
    return s


def write_calibration_yaml(result: dict, path: Path) -> None:
    lines = ["# Roofline efficiency terms per hardware, fitted by `kvsim calibrate` (kvsim/cost/calibrate.py) on the",
             "# real-GPU kernel timings in kvsim/profiles/imported/ (least squares in log time). Regenerate with:",
             "#     kvsim calibrate --out results/calibration --yaml kvsim/cost/calibration.yaml",
             "# Not fitted (a priori, kernel timings cannot show them): layer_overhead_s, step_overhead_s.",
             "# 'fitted' lists the parameters this hardware's own data identify; the others are the default's.",
             "# leave_one_out: the same fit with one (hardware, model) pair's profiles withheld (kvsim validate",
             "# --no-profile uses these so a case is replayed with a roofline that never saw its timings).",
             "hardware:"]

    def entry(p, fitted, indent="  "):
        d = _round(p)
        s = [f"{indent}  {k}: {yaml_number(v)}" for k, v in d.items()]
        if fitted is not None:
            s.append(f"{indent}  fitted: [{', '.join(fitted)}]")
        return s

    lines.append("  default:")
    lines += entry(result["default"], NAMES + [n for n in SKEW.values() if getattr(result["default"], n)])
    for hw, (p, free) in sorted(result["per_hw"].items()):
        lines.append(f"  {hw}:")
        lines += entry(p, free)
    if result["loo"]:
        lines.append("leave_one_out:")
        for (hw, model), (p, how) in sorted(result["loo"].items()):
            lines.append(f"  {hw}/{model}:  # {how}")
            lines += entry(p, None)
    path.write_text("\n".join(lines) + "\n")
    from kvsim.cost import roofline

    roofline.reload_calibration()


OP_ORDER = ["qkv", "o", "mlp", "moe", "other", "lm_head", "embedding", "final_norm", "sampler", "attn_decode",
            "attn_prefill", "attn_mixed", "all_reduce"]


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per (hardware, op): errors pooled over that hardware's tables (median over tables of each stat)."""
    out = []
    keys = sorted({(r["hardware"], r["op"]) for r in rows}, key=lambda k: (k[0], OP_ORDER.index(k[1])))
    for hw, op in keys:
        sel = [r for r in rows if r["hardware"] == hw and r["op"] == op]
        agg = {"hardware": hw, "op": op, "tables": len(sel), "points": sum(r["points"] for r in sel)}
        for k in ("before_median_abs_pct", "after_median_abs_pct", "after_p90_abs_pct", "default_median_abs_pct",
                  "loo_median_abs_pct", "loo_p90_abs_pct"):
            vals = [r[k] for r in sel if k in r]
            agg[k] = float(np.median(vals)) if vals else None
        out.append(agg)
    return out


def format_markdown(result: dict) -> str:
    srows = summary_rows(result["rows"])
    lines = ["| hardware | operator | tables | points | before: median abs err % | after: median | after: p90 | "
             "leave-one-out: median | leave-one-out: p90 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    for r in srows:
        lines.append(f"| {r['hardware']} | {r['op']} | {r['tables']} | {r['points']} | {f(r['before_median_abs_pct'])} | "
                     f"{f(r['after_median_abs_pct'])} | {f(r['after_p90_abs_pct'])} | {f(r['loo_median_abs_pct'])} | "
                     f"{f(r['loo_p90_abs_pct'])} |")
    lines += ["", "Fitted parameters (efficiencies are fractions of the datasheet peaks in kvsim/specs/data/hardware.yaml):", "",
              "| hardware | " + " | ".join(NAMES) + " | fitted here |", "|---|" + "---:|" * len(NAMES) + "---|"]
    ents = [("default", result["default"], NAMES)] + [(hw, p, free) for hw, (p, free) in sorted(result["per_hw"].items())]
    for name, p, free in ents:
        cells = []
        for n in NAMES:
            v = getattr(p, n)
            cells.append(f"{v * 1e6:.1f} us" if n.endswith("_s") else f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(free) if name != 'default' else 'all'} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "operator_errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    srows = summary_rows(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(srows[0]), lineterminator="\n")
        w.writeheader()
        for r in srows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    with open(out / "params.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["entry", "param", "value", "fitted"])
        ents = [("default", result["default"], NAMES)] + [(hw, p, free) for hw, (p, free) in sorted(result["per_hw"].items())]
        ents += [(f"loo:{hw}/{m}", p, []) for (hw, m), (p, _) in sorted(result["loo"].items())]
        for name, p, free in ents:
            for n in NAMES + list(A_PRIORI):
                w.writerow([name, n, f"{getattr(p, n):.6g}", "yes" if n in free else ("a priori" if n in A_PRIORI else "no")])
    (out / "summary.md").write_text(format_markdown(result))
    plot_fit(result, out / "fit.png")
    params = {hw: p for hw, (p, _) in result["per_hw"].items()}
    write_mixed_check(mixed_attention_check(params=params), out)


def plot_fit(result: dict, path: Path) -> None:
    """Predicted against measured time, every point, per hardware (after calibration)."""
    from kvsim.metrics.plots import pyplot

    plt = pyplot()
    hws = sorted(result["per_hw"])
    fig, axes = plt.subplots(1, len(hws), figsize=(4 * len(hws), 4), squeeze=False)
    for ax, hw in zip(axes[0], hws):
        p = result["per_hw"][hw][0]
        for op in OP_ORDER:
            ts = [t for t in result["tables"] if t.hardware == hw and t.op == op]
            if not ts:
                continue
            m = np.concatenate([t.measured for t in ts])
            pr = np.concatenate([predict(t, p) for t in ts])
            ax.loglog(m * 1e6, pr * 1e6, ".", ms=2, label=op, alpha=0.6)
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k-", lw=0.6)
        ax.set_title(hw, fontsize=9)
        ax.set_xlabel("measured (us)")
        ax.set_ylabel("calibrated roofline (us)")
        ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_mixed_check(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    with open(out / "mixed_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def mixed_attention_check(perf_dir: Path | None = None, params: dict | None = None) -> list[dict]:
    """LLMServingSim's attention.csv also times mixed calls (one prefill chunk plus n decodes in one
    call), which no profile table holds. Compare three predictions of each mixed row with the GPU:
    the sum of the measured pure-prefill and pure-decode times (what a per-part lookup gives), the
    measured pure prefill plus kvsim's model of decodes inside a prefill call
    (``RooflineCost.mixed_decode_attention_time_s``, no parameter fitted on mixed rows), and the
    calibrated roofline alone for both parts. Empty when the reference data is absent."""
    from kvsim.methods.none import NoCompression
    from kvsim.specs.hardware import load_hardware
    from kvsim.specs.model import load_model

    perf_dir = perf_dir or shared_dir() / "reference" / "llmservingsim" / "perf"
    out = []
    for sub, (hw, model, tp) in LSS_ATTENTION.items():
        path = perf_dir / sub / "attention.csv"
        if not path.is_file():
            continue
        pp, pd, mixed = {}, {}, []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                pc, kp, nd, kd = (int(r[k]) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode"))
                t = float(r["time_us"]) * 1e-6
                if nd == 0:
                    pp[(pc, kp)] = t
                elif pc == 0:
                    pd[(nd, kd)] = t
                else:
                    mixed.append((pc, kp, nd, kd, t))
        p = (params or {}).get(hw) or None
        from kvsim.cost.roofline import calibrated_params

        roof = RooflineCost(load_model(model), load_hardware(hw), NoCompression(), tp, p or calibrated_params(hw))
        m = roof.model
        e_sum, e_kv, e_roof = [], [], []
        for pc, kp, nd, kd, t in mixed:
            if (pc, kp) not in pp or (nd, kd) not in pd:
                continue
            dec = roof.mixed_decode_attention_time_s(nd, nd * (kd + 1)) / m.num_layers
            pre = roof.prefill_attention_time_s([(pc, pc + kp, True)]) / m.num_layers
            e_sum.append((pp[(pc, kp)] + pd[(nd, kd)]) / t - 1.0)
            e_kv.append((pp[(pc, kp)] + dec) / t - 1.0)
            e_roof.append((pre + dec) / t - 1.0)
        if not e_sum:
            continue
        row = {"source": sub, "hardware": hw, "model": model, "tp": tp, "mixed_rows": len(e_sum)}
        for name, e in (("sum_of_pure_tables", e_sum), ("prefill_table_plus_kvsim_decode_in_prefill_call", e_kv),
                        ("calibrated_roofline", e_roof)):
            a = np.abs(np.asarray(e)) * 100
            row[f"{name}_median_abs_pct"] = float(np.median(a))
            row[f"{name}_p90_abs_pct"] = float(np.percentile(a, 90))
            row[f"{name}_mean_pct"] = float(np.mean(e) * 100)
        out.append(row)
    return out
