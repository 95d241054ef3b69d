"""``kvsim sweep grid.yaml --out DIR``: a grid of replays (the cartesian product of its axes) run in parallel.

grid.yaml is a mapping. These keys are settings shared by every cell::

    trace: traces/sample.jsonl     # a path; a list makes it an axis
    slo: ttft_ms:p99=2000,tpot_ms:p99=100   # optional: adds slo_met / slo_margin_pct columns and goodput
    limit: 200                     # optional: first N requests
    format: kvsim                  # optional: trace format (default: detected)
    skip_invalid: false
    profile: auto                  # auto (a committed profile if one matches) | none (roofline) | a path

and every other key is an axis, a list of values (a scalar is a one-value axis): ``model``, ``hardware``,
``method`` (spec strings, or mappings whose list-valued knobs expand, e.g.
``{name: h2o, budget: [256, 512]}``), ``rate_scale``, ``num_replicas``, ``tensor_parallel_size`` and any
engine option (``max_num_seqs``, ``enable_prefix_caching``, ...). Axes may also be put under a ``grid:`` key.

Each cell is one replay in a worker. Its result row = the cell's parameters + the flattened summary
(``ttft_ms_p99``, ``output_throughput``, ...) + ``status`` (ok | error), ``error`` and ``elapsed_s``.
Rows are appended to ``DIR/cells.jsonl`` as cells finish, so a killed sweep loses only the cells in
flight. A rerun skips every cell already there whose id (a hash of its parameters) and ``inputs_sha``
(a hash of the content of its inputs: the trace, the profile, a model config.json given as a path, and
the kvsim version) both match, so editing a trace in place reruns the cells that read it. Cells that
errored are skipped too (``retry_failed`` reruns them); cells whose worker died (``status=lost``: killed,
out of memory) are never skipped. At the end ``DIR/results.csv`` and ``DIR/results.parquet`` (pyarrow,
the ``sweep`` extra) hold the current grid's cells, one row each, each file replaced whole.

Executors (:mod:`kvsim.plan.executors`): ``local`` (``jobs`` worker processes, one cell at a time each;
``jobs=1`` runs in this process) or ``ray`` (the ``ray`` extra): one task per cell on the Ray cluster
``ray_address`` points to (default: the running one, else a local instance). Workers must be able to
import kvsim and read the trace path (the path is made absolute before dispatch). SIGTERM or Ctrl-C stops
the workers and the sweep cleanly (exit code 128 + the signal), keeping every finished cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from kvsim.config import FIELDS as ENGINE_FIELDS
from kvsim.config import read_yaml
from kvsim.errors import ConfigError, KvsimError
from kvsim.outputs import atomic_write_text, ensure_out_dir, json_lines
from kvsim.plan.executors import run_local, run_ray, stop_on_signals

#: top-level keys that are settings, not axes
SETTINGS = ("trace", "slo", "limit", "format", "skip_invalid", "profile")
RUN_AXES = ("model", "hardware", "method", "rate_scale")
DEFAULTS = {"model": "llama-3.1-8b", "hardware": "h100", "method": "none", "rate_scale": 1.0, "profile": "auto",
            "limit": None, "format": None, "skip_invalid": False, "slo": None}
STATUS_COLUMNS = ["cell_id", "status", "error", "elapsed_s"]


# -- the grid --------------------------------------------------------------------------------------------
@dataclass
class Grid:
    settings: dict  # shared by every cell (trace, slo, limit, ...)
    axes: dict  # name -> list of values, in file order
    base_dir: Path  # where relative trace / profile paths are also looked up

    def cells(self) -> list[dict]:
        names = list(self.axes)
        out = []
        for combo in itertools.product(*(self.axes[n] for n in names)):
            params = {**{k: v for k, v in self.settings.items() if k not in self.axes}, **dict(zip(names, combo))}
            out.append(params)
        return out

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.axes.values()) if self.axes else 1


def _expand_method(m) -> list:
    """A method entry: a spec string, or a mapping whose list-valued knobs expand into several specs."""
    from kvsim.methods import parse_method

    if isinstance(m, dict):
        d = dict(m)
        name = d.pop("name", None)
        if name is None:
            raise ConfigError(f"grid: method mapping {m!r} has no 'name'")
        keys = list(d)
        vals = [v if isinstance(v, list) else [v] for v in d.values()]
        return [parse_method({"name": name, **dict(zip(keys, c))}).spec_string() for c in itertools.product(*vals)]
    return [parse_method(str(m)).spec_string()]


def _check_value(key: str, val, where: str) -> None:
    """One value of an axis, checked alone before any cell runs: a typo fails the sweep at once instead of
    becoming a column of failed cells. (Rules that tie several options together are left to the cells.)"""
    if key in ("rate_scale", "limit"):
        from kvsim.replay import check_stream_options

        try:
            check_stream_options(val if key == "rate_scale" else 1.0, val if key == "limit" else None)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif key in ENGINE_FIELDS:
        from kvsim.config import coerce_option, config_from_mapping

        if key == "enable_expert_parallel":  # valid only with other options: type alone
            coerce_option(key, val, where)
        else:
            config_from_mapping({key: val}, source=where)


def load_grid(grid, base_dir=None) -> Grid:
    """A path to grid.yaml, or the same mapping in Python."""
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, (str, Path)):
        p = Path(grid)
        data = read_yaml(p, "grid file")
        base = p.resolve().parent
        where = str(p)
    else:
        data, base, where = grid, Path(base_dir or "."), "grid"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of axes to lists")
    data = dict(data)
    nested = data.pop("grid", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}: 'grid' must be a mapping of axes to lists")
    if "fmt" in data:
        data["format"] = data.pop("fmt")
    if isinstance(data.get("slo"), list):  # a list of terms is one SLO, not an axis
        data["slo"] = ",".join(str(t) for t in data["slo"])
    settings = {k: data.pop(k) for k in SETTINGS if k in data and not isinstance(data[k], list)}
    raw_axes = {**data, **nested}
    if "trace" not in settings and "trace" not in raw_axes:
        raise ConfigError(f"{where}: no 'trace'")
    if "methods" in raw_axes and "method" not in raw_axes:
        raw_axes["method"] = raw_axes.pop("methods")
    axes = {}
    for k, v in raw_axes.items():
        key = str(k).replace("-", "_")
        if key == "fmt":
            key = "format"
        if key not in RUN_AXES and key not in ENGINE_FIELDS and key not in SETTINGS:
            raise ConfigError(f"{where}: unknown axis {k!r}; axes are {', '.join(RUN_AXES)}, the settings "
                              f"{', '.join(SETTINGS)} and engine options ({', '.join(sorted(ENGINE_FIELDS))})")
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise ConfigError(f"{where}: axis {k!r} is an empty list")
        if key == "method":
            vals = [s for m in vals for s in _expand_method(m)]
        for val in vals:
            _check_value(key, val, f"{where}: axis {k!r}")
        axes[key] = vals
    for key in ("limit", "rate_scale"):
        if key in settings:
            _check_value(key, settings[key], f"{where}: {key!r}")
    if settings.get("slo") is not None:
        from kvsim.metrics.slo import parse_slo_terms

        settings["slo"] = ",".join(str(t) for t in parse_slo_terms(settings["slo"]))
    return Grid(settings, axes, base)


def cell_id(params: dict) -> str:
    """A stable id for a cell: a hash of its parameters (order-free)."""
    text = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _resolve_path(value, base_dir: Path):
    if value is None:
        return None
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p.resolve())
    q = base_dir / p
    return str(q.resolve()) if q.exists() else str(p)


def _file_sha(path, cache: dict) -> str | None:
    """sha256 of a file's bytes (None when it cannot be read: the cell will report why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in cache:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for buf in iter(lambda: f.read(1 << 20), b""):
                    h.update(buf)
        except OSError:
            return None
        cache[key] = h.hexdigest()
    return cache[key]


def _profile_path(params: dict, base_dir: Path):
    """The profile file a cell will load: its explicit path, or the committed one ``auto`` picks."""
    prof = params.get("profile", "auto")
    prof_s = str(prof).lower() if prof is not None else "none"
    if prof_s in ("none", "roofline", "false"):
        return None
    if prof_s != "auto":
        return _resolve_path(prof, base_dir)
    try:
        from kvsim.cost.profiled import profile_candidates
        from kvsim.specs.hardware import load_hardware
        from kvsim.specs.model import load_model

        model = load_model(_resolve_model(params.get("model", DEFAULTS["model"]), base_dir)).name
        hw = load_hardware(params.get("hardware", DEFAULTS["hardware"])).name
        found = profile_candidates(model, hw, int(params.get("tensor_parallel_size", 1)))
    except (KvsimError, ValueError, TypeError, OSError):
        return None  # the cell fails on the same error and reports it
    return str(found[0]) if found else None


def _model_file(model, base_dir: Path) -> str | None:
    """The config.json a model given as a path reads (None for a shipped short name)."""
    p = Path(str(model))
    if not (p.suffix == ".json" or p.exists() or (base_dir / p).exists()):
        return None
    q = Path(_resolve_path(model, base_dir))
    return str(q / "config.json") if q.is_dir() else str(q)


def _resolve_model(model, base_dir: Path):
    return model if _model_file(model, base_dir) is None else _resolve_path(model, base_dir)


def inputs_sha(params: dict, base_dir=None, cache: dict | None = None) -> str:
    """A hash of what a cell reads besides its parameters: the content of its trace, its profile (given
    or found) and a model config.json given as a path, and the kvsim version. The resume key with
    :func:`cell_id`: the same parameters over a changed file are a new cell."""
    from kvsim import __version__

    base = Path(base_dir or ".")
    cache = {} if cache is None else cache
    files = {"trace": _resolve_path(params.get("trace"), base), "profile": _profile_path(params, base)}
    files["model"] = _model_file(params.get("model", DEFAULTS["model"]), base)
    parts = {"kvsim": __version__, **{k: (_file_sha(v, cache) if v else None) for k, v in files.items()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# -- one cell ---------------------------------------------------------------------------------------------
def flatten_summary(summary: dict) -> dict:
    """A replay summary as one flat row: latency dicts become ``ttft_ms_mean``, ``ttft_ms_p50`` (median),
    ``ttft_ms_p90``, ``ttft_ms_p99``, ...; ``sim.*`` become ``sim_*``; ``engine`` and ``slo`` are dropped
    (the cell's parameters carry them); ``rejected_reasons`` becomes a JSON string."""
    row = {}
    for k, v in summary.items():
        if k in ("engine", "slo"):
            continue
        if k == "rejected_reasons":
            row[k] = json.dumps(v, sort_keys=True)
        elif isinstance(v, dict):
            prefix = "sim" if k == "sim" else k
            for kk, vv in v.items():
                row[f"{prefix}_{'p50' if kk == 'median' else kk}"] = vv
        else:
            row[k] = v
    return row


def summary_frame(summaries):
    """Summaries (dicts or ReplayResults) -> a pandas DataFrame, one flattened row each."""
    import pandas as pd

    return pd.DataFrame([flatten_summary(getattr(s, "summary", s)) for s in summaries])


def run_cell(params: dict, base_dir: str | None = None) -> dict:
    """Replay one cell; never raises: a failure becomes ``status=error`` with the error text."""
    t0 = time.perf_counter()
    row = {"cell_id": cell_id(params), **params}
    try:
        from kvsim.build import make_spec
        from kvsim.replay import replay
        from kvsim.config import config_from_mapping
        from kvsim.metrics.slo import check_slo, goodput_slo, parse_slo_terms

        base = Path(base_dir or ".")
        engine = {k: v for k, v in params.items() if k in ENGINE_FIELDS}
        cfg, _ = config_from_mapping(engine, source=f"cell {row['cell_id']}")
        prof = params.get("profile", "auto")
        prof_s = str(prof).lower() if prof is not None else "none"
        auto = prof_s == "auto"
        profile = None if prof_s in ("auto", "none", "roofline", "false") else _resolve_path(prof, base)
        terms = parse_slo_terms(params.get("slo"))
        spec = make_spec(_resolve_model(params.get("model", DEFAULTS["model"]), base),
                             params.get("hardware", DEFAULTS["hardware"]),
                             params.get("method", "none"), cfg, profile, goodput_slo(terms), auto_profile=auto)
        res = replay(_resolve_path(params["trace"], base), spec=spec, fmt=params.get("format"),
                         skip_invalid=bool(params.get("skip_invalid", False)), keep_rows=False, plot=False,
                         progress=False, rate_scale=float(params.get("rate_scale", 1.0)), limit=params.get("limit"))
        row.update(flatten_summary(res.summary))
        row["method"] = params.get("method", "none")  # keep the cell's spelling (the summary's is canonical)
        row["method_spec"] = res.summary["method"]
        if terms:
            chk = check_slo(res.summary, terms)
            row.update(slo_met=chk["feasible"], slo_margin_pct=chk["margin_pct"], slo_worst_term=chk["worst_term"])
        row.update(status="ok", error=None)
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
        row.update(status="error", error=f"{type(e).__name__}: {e}")
        if not isinstance(e, (ConfigError, ValueError, FileNotFoundError)):
            row["traceback"] = traceback.format_exc(limit=6)
    row["elapsed_s"] = time.perf_counter() - t0
    return row


def lost_row(params: dict, why: str) -> dict:
    """The row of a cell whose worker died under it: not a result, so a rerun retries it."""
    return {"cell_id": cell_id(params), **params, "status": "lost",
            "error": f"{why} while running this cell; a rerun retries it", "elapsed_s": None}


def _run_cell_args(args):
    return run_cell(*args)


# -- results on disk ------------------------------------------------------------------------------------------
def read_cells(path) -> dict[str, dict]:
    """cells.jsonl -> {cell_id: row}; a later line for the same id wins; a line cut short by a kill is
    ignored (its cell reruns). Bytes that are not UTF-8 were not written by kvsim (rows are ASCII JSON):
    a ConfigError naming the file and line."""
    done: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return done
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, expected the sweep's cells.jsonl file")
    with open(p, "rb") as f:
        for _, row in json_lines(f, str(p), hint="; remove the line (its cell then reruns) or the file"):
            if isinstance(row, dict) and isinstance(row.get("cell_id"), str):  # None: cut short by a kill
                done[row["cell_id"]] = row
    return done


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def write_results(rows: list[dict], out_dir, param_cols: list[str]) -> dict:
    """results.csv (always) and results.parquet (when pandas and pyarrow are installed)."""
    out = Path(out_dir)
    paths = {"csv": out / "results.csv"}
    front = ["cell_id", *param_cols, "status", "error"]
    rest = []
    for r in rows:
        for k in r:
            if k not in front and k not in rest and k != "traceback":
                rest.append(k)
    cols = front + rest
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is None:
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        atomic_write_text(paths["csv"], buf.getvalue())
        warnings.warn("pandas is not installed: wrote results.csv only (pip install 'kvsim[sweep]' for Parquet)")
        return paths
    df = pd.DataFrame(rows, columns=cols)
    atomic_write_text(paths["csv"], df.to_csv(index=False))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        warnings.warn("pyarrow is not installed: wrote results.csv only (pip install 'kvsim[sweep]' for Parquet)")
        return paths
    pq = df.copy()
    for c in pq.columns:  # mixed-type object columns (e.g. an axis of [null, 256, "x"]) as strings
        if pq[c].dtype == object:
            types = {type(v) for v in pq[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(types) > 1:
                pq[c] = pq[c].map(lambda v: None if v is None else str(v))
    paths["parquet"] = out / "results.parquet"
    tmp = out / ".results.parquet.tmp"
    pq.to_parquet(tmp, index=False)
    os.replace(tmp, paths["parquet"])
    return paths


@dataclass
class SweepResult:
    rows: list[dict]
    out_dir: Path
    paths: dict
    ran: int
    skipped: int
    failed: int  # errored or lost
    lost: int = 0  # lost with their worker (killed, out of memory): a rerun retries them

    def df(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def run_sweep(grid, out_dir, executor: str = "local", jobs: int | None = None, progress: bool = True,
              retry_failed: bool = False, ray_address: str | None = None, base_dir=None) -> SweepResult:
    """Run every cell of ``grid`` not already done in ``out_dir/cells.jsonl`` (same parameters, same input
    content); return all of the grid's rows. SIGTERM / SIGINT raise :class:`SweepStopped` after the
    workers are stopped; the cells finished by then are in cells.jsonl."""
    g = load_grid(grid, base_dir)
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; use local or ray")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"jobs={jobs!r} must be a positive integer (1 runs the cells in this process)")
    out = ensure_out_dir(out_dir)
    cells_path = out / "cells.jsonl"
    done = read_cells(cells_path)
    cells = g.cells()
    ids = [cell_id(c) for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError("grid: two cells have the same parameters (a repeated axis value?)")
    cache: dict = {}
    shas = {i: inputs_sha(c, g.base_dir, cache) for c, i in zip(cells, ids)}

    def keep(r, sha):  # a row that stands for this cell: same inputs, and a result (lost is none)
        return r.get("inputs_sha") == sha and (
            r.get("status") == "ok" or (r.get("status") == "error" and not retry_failed))

    todo = [c for c, i in zip(cells, ids) if not (i in done and keep(done[i], shas[i]))]
    skipped = len(cells) - len(todo)
    jobs = jobs if jobs is not None else (os.cpu_count() or 1)
    atomic_write_text(out / "grid.json", json.dumps({"settings": g.settings, "axes": g.axes}, indent=1, default=str) + "\n")
    bar = None

    def on_start():
        nonlocal bar
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cells), initial=skipped, unit="cell", desc="sweep", file=sys.stderr, disable=None)

    failed = lost = 0
    if cells_path.exists() and cells_path.stat().st_size:
        with open(cells_path, "rb") as fb:
            fb.seek(-1, os.SEEK_END)
            torn = fb.read(1) != b"\n"
        if torn:  # a line cut short by a kill: end it, so the next row starts on its own line
            with open(cells_path, "a") as f:
                f.write("\n")
    with open(cells_path, "a") as f, stop_on_signals():
        def on_done(params, row):
            nonlocal failed, lost
            row["inputs_sha"] = shas[row["cell_id"]]
            done[row["cell_id"]] = row
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            if row.get("status") != "ok":
                failed += 1
                lost += row.get("status") == "lost"
            if bar is not None:
                bar.update(1)
                if failed:
                    bar.set_postfix(failed=failed)

        def on_lost(params, why):
            on_done(params, lost_row(params, why))

        try:
            if not todo:
                on_start()
            elif executor == "local":
                run_local(todo, str(g.base_dir), jobs, on_done, on_start, run_cell, on_lost)
            else:
                run_ray(todo, str(g.base_dir), jobs, on_done, on_start, run_cell, on_lost, ray_address)
        finally:
            if bar is not None:
                bar.close()
    rows = [done[i] for i in ids]
    param_cols = list(dict.fromkeys(k for c in cells for k in c))
    paths = write_results(rows, out, param_cols)
    return SweepResult(rows, out, paths, len(todo), skipped, failed, lost)
