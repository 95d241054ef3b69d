"""``kvprof fit RAW --out PROFILE``: raw kernel points -> a kvsim profile (schema v1).

Each table becomes a regular grid over the axis values that appear in its points, holding measured
medians only: ``null`` where a point ran out of memory or was not measured, including the prefill cells
with ``kv_tokens < chunk_tokens`` that no chunk can have (kvsim's ``prefill_lookup`` interpolates along
the diagonal between measured rows instead).

Leave-one-out error: every measured point that is interior along an axis is predicted from its two
measured neighbours along that axis (log-log linear, i.e. with a grid twice as coarse as the real
one, so a conservative figure); the table reports the median and p90 of |predicted / measured - 1|.
No torch needed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import numpy as np

from kvsim.cost.profile import SCHEMA, SCHEMA_VERSION, interp_loglog, write_profile
from profiler.kernels import RawError, raw_path, read_raw

_KNOWN_GPUS = ("h200", "h100", "h20", "b200", "b100", "gh200", "a100", "a10g", "a10", "l40s", "l40", "l4",
               "mi300x", "mi325x", "mi250x", "v100", "t4", "rtx 4090", "rtx 3090")


def hardware_name(header: dict) -> str:
    """Short hardware name from the device string (``NVIDIA H100 80GB HBM3`` -> ``h100``)."""
    if header.get("device_type") not in (None, "cuda"):
        return str(header.get("device_type"))
    dev = str(header.get("device", "unknown")).lower()
    for g in _KNOWN_GPUS:
        if re.search(rf"(^|[^a-z0-9]){re.escape(g)}([^a-z0-9]|$)", dev):
            return g.replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "-", dev).strip("-") or "unknown"


def _grid_of(points: list[dict]):
    """Axis names (in record order), sorted values per axis, and value -> index maps."""
    names = list(points[0]["axes"])
    values = {n: sorted({p["axes"][n] for p in points}) for n in names}
    return names, values


def _nested(cells: dict, shape: list[int]):
    def build(prefix):
        d = len(prefix)
        if d == len(shape):
            return cells.get(tuple(prefix))
        return [build(prefix + [i]) for i in range(shape[d])]

    return build([])


def loo_errors(measured: dict, values: list[list[float]]) -> list[float]:
    """Abs % errors of predicting each measured interior point from its two neighbours along each axis."""
    errs = []
    for idx, t in measured.items():
        for d, xs in enumerate(values):
            i = idx[d]
            if i == 0 or i == len(xs) - 1:
                continue
            lo, hi = list(idx), list(idx)
            lo[d], hi[d] = i - 1, i + 1
            a, b = measured.get(tuple(lo)), measured.get(tuple(hi))
            if a is None or b is None:
                continue
            pred = interp_loglog(xs[i], xs[i - 1], a, xs[i + 1], b)
            errs.append(abs(pred / t - 1.0) * 100.0)
    return errs


def fit(raw, name: str | None = None, hardware: str | None = None, step_overhead_s: float = 0.0,
        command: str = "") -> tuple[dict, list[dict]]:
    """Build the profile dict from a raw file; also returns one summary row per table."""
    rpath = raw_path(raw)
    header, sessions, points = read_raw(rpath)
    by_table: dict[str, list[dict]] = {}
    for rec in points.values():
        by_table.setdefault(rec["table"], []).append(rec)
    tables, loo, rows = {}, {}, []
    for tname in sorted(by_table):
        pts = by_table[tname]
        names, values = _grid_of(pts)
        index = [{v: i for i, v in enumerate(values[n])} for n in names]
        measured, n_oom = {}, 0
        for p in pts:
            idx = tuple(index[d][p["axes"][n]] for d, n in enumerate(names))
            if p.get("oom"):
                n_oom += 1
            elif p.get("median_s") and p["median_s"] > 0:
                measured[idx] = float(p["median_s"])
        row = {"table": tname, "points": len(pts), "measured": len(measured), "oom": n_oom,
               "loo_n": 0, "median_abs_pct": None, "p90_abs_pct": None}
        rows.append(row)
        if not measured:
            continue
        shape = [len(values[n]) for n in names]
        tables[tname] = {"axes": {n: values[n] for n in names}, "time_s": _nested(measured, shape)}
        errs = sorted(loo_errors(measured, [values[n] for n in names]))
        if errs:
            row.update(loo_n=len(errs), median_abs_pct=round(float(np.percentile(errs, 50)), 3),
                       p90_abs_pct=round(float(np.percentile(errs, 90)), 3))
            loo[tname] = {"median_abs_pct": row["median_abs_pct"], "p90_abs_pct": row["p90_abs_pct"],
                          "num_points": len(errs)}
    hw = hardware or hardware_name(header)
    tp = int(header.get("tensor_parallel_size", 1))
    methods = dict(header.get("methods") or {})
    for s in sessions:
        methods.update(s.get("methods") or {})
    recorded = header.get("implementations") or {}
    if any(m not in recorded for m in methods):
        from profiler.methods import implementation

        # raw files written before the header recorded it: the kernels then were the same ones
        recorded = {m: recorded[m] if m in recorded else implementation(m) for m in methods}
    impls = {m: recorded[m] for m in methods}
    profile = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name or f"{hw}-{header['model']}-tp{tp}-kvprof",
        "model": header["model"],
        "hardware": hw,
        "tensor_parallel_size": tp,
        "dtype": header.get("dtype"),
        "provenance": {
            "source": "kvprof kernels", "command": header.get("command"), "device": header.get("device"),
            "driver": header.get("driver"), "torch": header.get("torch"), "cuda": header.get("cuda"),
            "date": header.get("date"), "grid": header.get("grid"), "decode_kv": header.get("decode_kv"),
            "block_size": header.get("block_size"), "methods": methods, "implementations": impls,
            "timing": header.get("timing"),
            "resumed_sessions": [s.get("date") for s in sessions], "raw": str(rpath), "fit_command": command,
        },
        "step_overhead_s": step_overhead_s,
        "tables": tables,
        "lengths": {},
        "loo_error": loo,
    }
    return profile, rows


def print_rows(rows: list[dict], file=None) -> None:
    file = file or sys.stdout

    def f(x):
        return "n/a" if x is None else f"{x:.2f}"

    print(f"{'table':<32} {'points':>6} {'meas.':>6} {'oom':>4} {'loo n':>6} {'loo med %':>9} {'loo p90 %':>9}",
          file=file)
    for r in rows:
        print(f"{r['table']:<32} {r['points']:>6} {r['measured']:>6} {r['oom']:>4} {r['loo_n']:>6} "
              f"{f(r['median_abs_pct']):>9} {f(r['p90_abs_pct']):>9}", file=file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="kvprof fit", description=__doc__.split("\n\n")[0])
    p.add_argument("raw", help="raw.jsonl written by kvprof kernels (or its directory)")
    p.add_argument("--out", required=True, help="profile JSON to write (load with kvsim replay --profile)")
    p.add_argument("--name", default=None, help="profile name (default HARDWARE-MODEL-tpN-kvprof)")
    p.add_argument("--hardware", default=None, help="hardware name kvsim knows (default: from the device name)")
    p.add_argument("--step-overhead-s", type=float, default=0.0,
                   help="fixed time per engine step (scheduling, sampling, launch gaps); default 0")
    args = p.parse_args(argv)
    from kvsim.errors import KvsimError

    if not raw_path(args.raw).exists():
        print(f"kvprof fit: {raw_path(args.raw)} does not exist", file=sys.stderr)
        return 2
    try:
        profile, rows = fit(args.raw, args.name, args.hardware, args.step_overhead_s,
                            command="kvprof fit " + shlex.join(argv))
        if not profile["tables"]:
            print(f"kvprof fit: {raw_path(args.raw)} has no measured point", file=sys.stderr)
            return 2
        out = write_profile(args.out, profile)
    except (RawError, KvsimError) as e:
        print(f"kvprof fit: {e}", file=sys.stderr)
        return 2
    print_rows(rows)
    print(f"wrote {out} ({len(profile['tables'])} tables, hardware {profile['hardware']}, model {profile['model']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
