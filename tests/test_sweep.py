"""Tests of kvsim.plan.sweep (``kvsim sweep``): grid expansion, results table, resume, failures, executors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.plan import cell_id, flatten_summary, load_grid, read_cells, run_cell, run_sweep

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "traces" / "sample.jsonl"


def small_grid(**over) -> dict:
    g = {"trace": str(SAMPLE), "limit": 30, "slo": "ttft_ms:p99=2000,tpot_ms:p99=100",
         "hardware": ["h100"], "method": ["none", "kivi:bits=2"], "num_replicas": [1, 2]}
    g.update(over)
    return g


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def read_csv(p: Path) -> list[dict]:
    with open(p) as f:
        return list(csv.DictReader(f))


# -- the grid -------------------------------------------------------------------------------------------
def test_load_grid_axes_settings_and_method_expansion(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(
        "trace: traces/sample.jsonl\nslo: [ttft_ms:p99=2000, tpot_ms=100]\nlimit: 10\n"
        "model: llama-3.1-8b\nhardware: [h100, a100]\n"
        "method: [none, {name: h2o, budget: [128, 256]}]\nrate_scale: [1, 2]\n"
        "grid:\n  max-num-seqs: [64]\n")
    g = load_grid(p)
    assert g.settings == {"trace": "traces/sample.jsonl", "slo": "ttft_ms:p99=2000,tpot_ms:p99=100", "limit": 10}
    assert g.axes["method"] == ["none", "h2o:budget=128,window=32,impl=lmdeploy", "h2o:budget=256,window=32,impl=lmdeploy"]
    assert g.axes["model"] == ["llama-3.1-8b"] and g.axes["max_num_seqs"] == [64]
    assert len(g) == 1 * 2 * 3 * 2 * 1 == len(g.cells())
    c = g.cells()[0]
    assert c["trace"] == "traces/sample.jsonl" and c["hardware"] == "h100" and c["max_num_seqs"] == 64
    assert g.base_dir == tmp_path.resolve()
    for bad in ({"trace": "t", "colour": [1]}, {"method": ["none"]}, {"trace": "t", "hardware": []},
                {"trace": "t", "method": ["nosuch"]}):
        with pytest.raises(KvsimError):
            load_grid(bad)


def test_cell_id_is_stable_and_order_free():
    a = {"method": "none", "rate_scale": 1, "trace": "x"}
    assert cell_id(a) == cell_id(dict(reversed(list(a.items()))))
    assert cell_id(a) != cell_id({**a, "rate_scale": 2})
    assert len(cell_id(a)) == 16


def test_run_cell_ok_and_error_rows():
    row = run_cell({"trace": str(SAMPLE), "limit": 20, "method": "h2o:budget=512", "slo": "ttft_ms:p99=2000"})
    assert row["status"] == "ok" and row["error"] is None and row["completed"] == 20
    assert row["method"] == "h2o:budget=512" and row["method_spec"] == "h2o:budget=512,window=32,impl=lmdeploy"
    assert {"ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p99", "output_throughput", "slo_met", "sim_wall_s"} <= set(row)
    bad = run_cell({"trace": str(SAMPLE), "limit": 5, "model": "llama-3.1-70b"})  # does not fit on one H100
    assert bad["status"] == "error" and "does not fit" in bad["error"] and bad["elapsed_s"] >= 0
    missing = run_cell({"trace": "no/such/trace.jsonl"})
    assert missing["status"] == "error" and "FileNotFoundError" in missing["error"]


def test_flatten_summary():
    s = {"method": "none", "ttft_ms": {"mean": 1.0, "median": 2.0, "p99": 3.0}, "engine": {"seed": 0},
         "slo": {}, "rejected_reasons": {"too_long": 2}, "sim": {"wall_s": 0.5}}
    assert flatten_summary(s) == {"method": "none", "ttft_ms_mean": 1.0, "ttft_ms_p50": 2.0, "ttft_ms_p99": 3.0,
                                  "rejected_reasons": '{"too_long": 2}', "sim_wall_s": 0.5}


# -- a sweep ------------------------------------------------------------------------------------------------
def test_sweep_table_failures_and_resume(tmp_path):
    grid = small_grid(model=["llama-3.1-8b", "llama-3.1-70b"])  # the 70B cells fail: no fit on one H100
    res = run_sweep(grid, tmp_path, jobs=1, progress=False)
    assert len(res.rows) == 8 and res.ran == 8 and res.skipped == 0 and res.failed == 4
    ok = [r for r in res.rows if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["model"] == "llama-3.1-8b" for r in ok)
    assert all("does not fit" in r["error"] for r in res.rows if r["status"] == "error")
    rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 8 and list(rows[0])[:2] == ["cell_id", "trace"]
    assert {"status", "error", "ttft_ms_p99", "slo_met", "slo_margin_pct"} <= set(rows[0])
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 8
    if _has("pandas") and _has("pyarrow"):
        import pandas as pd

        df = pd.read_parquet(tmp_path / "results.parquet")
        assert len(df) == 8 and set(df["status"]) == {"ok", "error"}

    # a rerun skips every finished cell (failed ones too, unless retry_failed)
    again = run_sweep(grid, tmp_path, jobs=1, progress=False)
    assert again.ran == 0 and again.skipped == 8
    assert [r["cell_id"] for r in again.rows] == [r["cell_id"] for r in res.rows]
    retry = run_sweep(grid, tmp_path, jobs=1, progress=False, retry_failed=True)
    assert retry.ran == 4 and retry.failed == 4

    # a killed sweep: keep 3 finished lines and a torn one; the rerun does the other 5 only
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    resumed = run_sweep(grid, tmp_path, jobs=1, progress=False)
    assert resumed.ran == 5 and resumed.skipped == 3
    assert len(read_cells(tmp_path / "cells.jsonl")) == 8

    # a grown grid runs only its new cells; the table holds the current grid's cells
    grown = run_sweep(small_grid(model=["llama-3.1-8b", "llama-3.1-70b"], num_replicas=[1, 2, 3]), tmp_path,
                      jobs=1, progress=False)
    assert grown.ran == 4 and grown.skipped == 8 and len(read_csv(tmp_path / "results.csv")) == 12


def test_sweep_process_pool_matches_in_process(tmp_path):
    a = run_sweep(small_grid(), tmp_path / "a", jobs=1, progress=False)
    b = run_sweep(small_grid(), tmp_path / "b", jobs=2, progress=False)
    key = lambda rows: {r["cell_id"]: (r["status"], r["ttft_ms_p99"], r["output_throughput"]) for r in rows}  # noqa: E731
    assert key(a.rows) == key(b.rows) and all(r["status"] == "ok" for r in b.rows)


def test_sweep_without_pandas_writes_csv_and_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.warns(UserWarning, match="results.csv only"):
        res = run_sweep(small_grid(method=["none"], num_replicas=[1]), tmp_path, jobs=1, progress=False)
    assert set(res.paths) == {"csv"} and not (tmp_path / "results.parquet").exists()
    assert read_csv(tmp_path / "results.csv")[0]["status"] == "ok"


def test_cli_sweep(tmp_path, capsys):
    g = tmp_path / "grid.yaml"
    g.write_text(f"trace: {SAMPLE}\nlimit: 20\nmethod: [none, fp8]\nrate_scale: [1, 2]\n")
    assert main(["sweep", str(g), "--out", str(tmp_path / "out"), "--jobs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 cells: ran 4 (failed 0)" in out
    assert main(["sweep", str(g), "--out", str(tmp_path / "out"), "--jobs", "1", "--quiet"]) == 0
    assert "skipped 4" in capsys.readouterr().out
    g.write_text(f"trace: {SAMPLE}\nlimit: 5\nmodel: [llama-3.1-70b]\n")
    assert main(["sweep", str(g), "--out", str(tmp_path / "bad"), "--jobs", "1", "--quiet"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_example_grid_loads():
    g = load_grid(REPO / "examples" / "grid.yaml")
    assert len(g) == len(g.cells()) == 32
    assert g.axes["method"][2:] == ["h2o:budget=256,window=32,impl=lmdeploy", "h2o:budget=1024,window=32,impl=lmdeploy"]


# -- Ray --------------------------------------------------------------------------------------------------------
def test_sweep_on_local_ray(tmp_path):
    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'kvsim[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = small_grid(model=["llama-3.1-8b", "llama-3.1-70b"], num_replicas=[1])
        res = run_sweep(grid, tmp_path / "ray", executor="ray", progress=False)
        assert ray.is_initialized()  # a cluster the caller started is left running
    finally:
        ray.shutdown()
    assert res.ran == 4 and res.failed == 2
    local = run_sweep(grid, tmp_path / "local", jobs=1, progress=False)
    key = lambda rows: {r["cell_id"]: (r["status"], r.get("ttft_ms_p99"), r.get("completed")) for r in rows}  # noqa: E731
    assert key(res.rows) == key(local.rows)
    assert len(json.loads((tmp_path / "ray" / "grid.json").read_text())["axes"]["model"]) == 2
