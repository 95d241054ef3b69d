"""``kvprof import {vidur,llmservingsim} DIR``: convert a published per-operator profile into a kvsim
profile (schema v1, ``docs/profile-schema.md``). No torch needed.

The source-specific parts live in :mod:`profiler.importers.vidur` and
:mod:`profiler.importers.llmservingsim`; each exposes ``build_profile(root, model, hardware, tp, ...)``
returning the profile dict, and ``available(root)`` listing the (hardware, model, tp) combinations a
directory holds. This module holds the command line and the helpers both share (grids, file hashes,
the JSON writer). What each source's columns mean and how they map onto the schema tables is written
down in ``docs/reference-data.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import shlex
import sys
from pathlib import Path
from typing import Iterable, Sequence

from kvsim.cost.profile import SCHEMA, SCHEMA_VERSION, interp_loglog, write_profile
from kvsim.errors import KvsimError

SOURCES = ("vidur", "llmservingsim")
#: significant digits kept for times in seconds (the sources resolve 1 us = 1e-6 s; 6 digits are lossless)
TIME_DIGITS = 6


class SourceDataError(KvsimError, ValueError):
    """A source directory or file that is missing, unknown or malformed; the message names the path."""


# ---------------------------------------------------------------------------------------------------
# small shared helpers
# ---------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, root: Path, upstream: dict | None = None) -> dict:
    """Provenance entry of one source file: path relative to the imported directory, size, sha256."""
    rec = {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    if upstream:
        rec["upstream"] = upstream
    return rec


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    if n == 0:
        raise ValueError("median of nothing")
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def round_time(t: float | None) -> float | None:
    """Seconds rounded to TIME_DIGITS significant digits (drops float noise from the ms/us -> s scaling)."""
    if t is None or not math.isfinite(t) or t <= 0:
        return None
    return float(f"{t:.{TIME_DIGITS}g}")


def num(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise SourceDataError(f"{path}:{line}: column {column!r}: {text!r} is not a number") from None


def table_1d(axis: str, points: dict[int, float]) -> dict:
    """A one-axis table from {axis value: seconds}; values sorted, strictly increasing."""
    xs = sorted(points)
    return {"axes": {axis: [int(x) for x in xs]}, "time_s": [round_time(points[x]) for x in xs]}


def table_2d(axis0: str, axis1: str, cells: dict[tuple[int, int], float | None]) -> dict:
    """A two-axis table on the product of the axis values present; ``null`` where no cell was given."""
    return table_nd((axis0, axis1), cells)


def table_nd(axes: Sequence[str], cells: dict[tuple, float | None]) -> dict:
    """A table with any number of axes on the product of the values present; ``null`` elsewhere."""
    values = [sorted({k[d] for k in cells}) for d in range(len(axes))]

    def build(d, prefix):
        if d == len(axes):
            return round_time(cells.get(prefix))
        return [build(d + 1, prefix + (x,)) for x in values[d]]

    return {"axes": {a: [int(x) for x in v] for a, v in zip(axes, values)}, "time_s": build(0, ())}


def resample_rows(rows: dict[int, dict[int, float]], axis1: Iterable[int] | None = None) -> tuple[dict, dict]:
    """Put rows measured at row-specific positions onto one shared second axis.

    ``rows`` maps a first-axis value to {second-axis value: seconds}. The shared axis is the union of
    every row's positions unless given. Within a row, a shared-axis value that the row measured keeps
    its measured time; one that lies strictly between two of the row's measured positions gets the
    log-log interpolation of its two neighbours; one outside the row's measured range stays ``null``
    (never extrapolated). Returns (cells, counts) with counts of measured and interpolated cells.
    """
    ys = sorted(set(axis1) if axis1 is not None else {y for r in rows.values() for y in r})
    cells: dict[tuple[int, int], float | None] = {}
    measured = interpolated = 0
    for x, row in rows.items():
        pos = sorted(row)
        j = 0
        for y in ys:
            if y in row:
                cells[(x, y)] = row[y]
                measured += 1
                continue
            if not pos or y < pos[0] or y > pos[-1]:
                cells[(x, y)] = None
                continue
            while pos[j + 1] < y:
                j += 1
            while pos[j] > y:  # ys sorted, so this only happens if j overshot; kept for safety
                j -= 1
            y0, y1 = pos[j], pos[j + 1]
            t0, t1 = row[y0], row[y1]
            cells[(x, y)] = interp_loglog(y, y0, t0, y1, t1) if t0 and t1 else None
            interpolated += 1
    return cells, {"measured_cells": measured, "interpolated_cells": interpolated}


def check_model_shape(model: str, expected: dict, where: str) -> str:
    """Compare the source's layer shape with kvsim's config of ``model``, if kvsim ships one.

    Returns a sentence for the provenance notes. Raises SourceDataError on a mismatch."""
    try:
        from kvsim.specs.model import load_model

        spec = load_model(model)
    except Exception as e:  # config not shipped (yet): the built-in table of source shapes still applies
        return f"kvsim has no model config {model!r} to compare shapes with ({type(e).__name__}); checked against the importer's own table only"
    got = {
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_kv_heads": spec.num_kv_heads,
        "intermediate_size": spec.moe_intermediate_size if spec.is_moe else spec.intermediate_size,
        "num_experts": spec.num_experts,
    }
    bad = {k: (v, got[k]) for k, v in expected.items() if k in got and v is not None and got[k] != v}
    if bad:
        detail = ", ".join(f"{k}: source {a} vs kvsim {b}" for k, (a, b) in bad.items())
        raise SourceDataError(f"{where}: the profiled shape does not match kvsim's model {model!r} ({detail})")
    return f"layer shape checked against kvsim's model config {model!r}: " + ", ".join(f"{k}={v}" for k, v in expected.items() if v is not None)


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def write(path: Path, profile: dict) -> None:
    """Validate and write atomically with kvsim's ``write_profile``; a grid that breaks the schema is
    reported as bad source data."""
    try:
        write_profile(path, profile)
    except KvsimError as e:
        raise SourceDataError(f"the imported profile does not validate: {e}") from None


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvprof import",
        description="Convert a published per-operator profile (Vidur's data/ tree, or LLMServingSim's "
        "profiler/perf tree) into a kvsim profile JSON (schema v1). Times become seconds per layer.",
    )
    p.add_argument("source", choices=SOURCES, help="which layout DIR has")
    p.add_argument("dir", metavar="DIR", help="vidur: the folder holding profiling/ (Vidur's data/); "
                   "llmservingsim: the perf/ folder holding <HW>/<org>/<model>/<variant>/tp<N>/")
    p.add_argument("--model", help="kvsim model short name (llama-2-7b, llama-3-8b, llama-3.1-8b, qwen3-32b, qwen3-30b-a3b)")
    p.add_argument("--hardware", help="kvsim hardware name (vidur: a100, h100, a40; llmservingsim: rtx-pro-6000, rtx-4090)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the profiled rank (default 1)")
    p.add_argument("--out", help="profile JSON to write")
    p.add_argument("--name", help="profile name (default <hardware>-<model>-tp<N>-<source>)")
    p.add_argument("--source-model", help="source folder <org>/<model> to read instead of the one --model maps to")
    p.add_argument("--network", help="vidur only: network folder for comm.all_reduce (default <device>_dgx, "
                   "else <device>_pairwise_nvlink; 'none' leaves the table out)")
    p.add_argument("--variant", default="bf16", help="llmservingsim only: variant folder (default bf16)")
    p.add_argument("--list", action="store_true", help="print the (hardware, model, tp) combinations DIR holds and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(f"profiler.importers.{args.source}")
    root = Path(args.dir)
    try:
        if args.list:
            for hw, model, tp, extra in mod.available(root):
                print(f"{hw}\t{model}\ttp{tp}\t{extra}")
            return 0
        missing = [o for o in ("model", "hardware", "out") if getattr(args, o) is None]
        if missing:
            parser.error("the following arguments are required: " + ", ".join("--" + m for m in missing))
        if args.tp < 1:
            parser.error("--tp must be >= 1")
        opts = {"source_model": args.source_model}
        if args.source == "vidur":
            opts["network"] = args.network
        else:
            opts["variant"] = args.variant
        profile = mod.build_profile(root, args.model, args.hardware, args.tp, **opts)
        if args.name:
            profile["name"] = args.name
        profile["provenance"]["command"] = "kvprof import " + shlex.join(argv)
        write(Path(args.out), profile)
    except SourceDataError as e:
        print(f"kvprof import {args.source}: error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(
        f"{t} ({'x'.join(str(len(v)) for v in tab['axes'].values())})" for t, tab in profile["tables"].items()
    )
    print(f"wrote {args.out} [kvsim.cost.profile.write_profile]: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
