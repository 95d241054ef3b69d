"""Tests of kvsim.plan.planner (``kvsim plan``) and of the documented Python API example (docs/api.md)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from kvsim import api
from kvsim.cli import main
from kvsim.config import EngineConfig
from kvsim.errors import ConfigError
from kvsim.plan import Planner, check_slo, goodput_slo, parse_slo_terms, plan_capacity
from kvsim.metrics.slo import SLOTerm
from kvsim.workload.synthetic import FixedLengths, synthetic_requests

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "traces" / "sample.jsonl"
SLO_TEXT = "ttft_ms:p99=2000,tpot_ms:p99=100"
# 120 requests of the sample trace at 8x its rate: one H100 is not enough for llama-3.1-8b, a few are
KW = dict(limit=120, rate_scale=8.0)


# -- SLO terms ------------------------------------------------------------------------------------------
def test_parse_slo_terms():
    t = parse_slo_terms("ttft_ms:p99=2000, tpot_ms:mean=50,e2el_ms=9000")
    assert t == (SLOTerm("ttft_ms", "p99", 2000.0), SLOTerm("tpot_ms", "mean", 50.0), SLOTerm("e2el_ms", "p99", 9000.0))
    assert [x.key for x in t] == ["ttft_ms_p99", "tpot_ms_mean", "e2el_ms_p99"]
    assert parse_slo_terms({"itl_ms:p50": 20}) == (SLOTerm("itl_ms", "p50", 20.0),)
    assert parse_slo_terms(None) == ()
    assert str(t[0]) == "ttft_ms:p99=2000"
    for bad in ("ttft:p99=1", "ttft_ms:p95=1", "ttft_ms:p99", "ttft_ms:p99=x", "ttft_ms:p99=0"):
        with pytest.raises(ConfigError):
            parse_slo_terms(bad)
    slo = goodput_slo(parse_slo_terms("ttft_ms:p99=2000,ttft_ms:p50=500,itl_ms:p99=80"))
    assert slo.ttft_ms == 500 and slo.tpot_ms is None


def test_check_slo_margin_and_rejections():
    terms = parse_slo_terms(SLO_TEXT)
    s = {"completed": 10, "rejected": 0, "ttft_ms": {"p99": 1500.0}, "tpot_ms": {"p99": 90.0}}
    c = check_slo(s, terms)
    assert c["feasible"] and c["worst_term"] == "tpot_ms:p99=100" and c["margin_pct"] == pytest.approx(10.0)
    s["ttft_ms"]["p99"] = 2500.0
    c = check_slo(s, terms)
    assert not c["feasible"] and c["margin_pct"] == pytest.approx(-25.0) and "ttft_ms:p99=2000" in c["reason"]
    # a rejected request is an SLO violation even when every latency is within its limit
    c = check_slo({"completed": 9, "rejected": 1, "ttft_ms": {"p99": 1.0}, "tpot_ms": {"p99": 1.0}}, terms)
    assert not c["feasible"] and "1 rejected" in c["reason"] and c["margin_pct"] > 0
    # a metric without samples (all one-token outputs: no TPOT) is met
    assert check_slo({"completed": 3, "rejected": 0, "ttft_ms": {"p99": 1.0}, "tpot_ms": {"p99": None}}, terms)["feasible"]


# -- the replica search --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planner():
    return Planner(SAMPLE, SLO_TEXT, **KW)


def test_bisection_finds_the_first_feasible_count_in_log_replays(planner):
    res = planner.min_replicas("none", 1, max_replicas=64)
    assert res.status == "ok" and res.num_replicas >= 2
    r = res.num_replicas
    assert res.evaluation.feasible and res.evaluation.num_replicas == r
    assert res.below is not None and not res.below.feasible and res.below.num_replicas == r - 1
    # exponential search + bisection: at most 2 ceil(log2 r) + 1 replays, not r
    assert res.num_replays <= 2 * math.ceil(math.log2(r)) + 1
    # the same answer as a linear scan (monotone here), checked with fresh replays
    fresh = Planner(SAMPLE, SLO_TEXT, **KW)
    scan = [fresh.evaluate("none", 1, n).feasible for n in range(1, r + 2)]
    assert scan.index(True) + 1 == r and all(scan[r - 1:])


def test_evaluation_matches_a_plain_replay(planner):
    ev = planner.evaluate("none", 1, 2)
    s = api.replay(SAMPLE, keep_rows=False, plot=False, config=EngineConfig(num_replicas=2), **KW).summary
    assert ev.values["ttft_ms_p99"] == pytest.approx(s["ttft_ms"]["p99"])
    assert ev.values["tpot_ms_p99"] == pytest.approx(s["tpot_ms"]["p99"])
    assert ev.completed == s["completed"] == 120


def test_check_above_and_infeasible_and_error_statuses(planner):
    res = planner.min_replicas("none", 1, check_above=True)
    assert res.above is not None and res.above.num_replicas == res.num_replicas + 1
    tight = Planner(SAMPLE, "ttft_ms:p99=1", **KW)  # 1 ms TTFT: impossible at any size
    res = tight.min_replicas("none", 1, max_replicas=4)
    assert res.status == "infeasible" and res.num_replicas is None and "4 replicas" in res.note
    assert res.num_replays == 3  # 1, 2, 4
    big = Planner(SAMPLE, SLO_TEXT, model="llama-3.1-70b", limit=20)
    res = big.min_replicas("none", 1)
    assert res.status == "error" and "does not fit" in res.note and res.num_replays == 1


def test_max_rate_brackets_the_boundary(planner):
    rr = planner.max_rate("none", 1, 1, rel_tol=0.05)
    assert rr.max_rate_scale is not None and rr.evaluation.feasible
    lo = rr.max_rate_scale
    above = [e for e in planner.log if e.num_replicas == 1 and e.method == "none" and lo < e.rate_scale <= lo * 1.05 + 1e-9]
    assert above and not any(e.feasible for e in above)
    assert rr.max_request_rate == pytest.approx(planner.info.request_rate * lo)
    # 8x was infeasible on one replica, so the search went down from there
    assert lo < 8.0


def test_plan_capacity_table_and_gpu_hours(tmp_path):
    res = plan_capacity(SAMPLE, SLO_TEXT, ["none", "kivi:bits=2"], tensor_parallel_sizes=(1, 2), max_rate=True,
                        rate_tol=0.1, out_dir=tmp_path, **KW)
    assert [r["method"] for r in res.rows] == ["none", "kivi:bits=2,group_size=32,residual_length=128,impl=lmdeploy"]
    assert len(res.candidates) == 4
    for r in res.rows:
        assert r["status"] == "ok"
        assert r["gpus"] == r["num_replicas"] * r["tensor_parallel_size"]
        same = [c for c in res.candidates if c["method"] == r["method"] and c["status"] == "ok"]
        assert r["gpus"] == min(c["gpus"] for c in same)
        dur_h = res.trace.duration_s / KW["rate_scale"] / 3600
        assert r["gpu_hours_per_million"] == pytest.approx(r["gpus"] * dur_h / r["completed"] * 1e6)
        assert r["margin_pct"] >= 0 and r["max_rate_scale"] >= KW["rate_scale"] * 0.999
    for name in ("plan.csv", "plan.md", "plan.json", "plan_candidates.csv"):
        assert (tmp_path / name).exists()
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["slo"] == ["ttft_ms:p99=2000", "tpot_ms:p99=100"] and len(doc["evaluations"]) == len(res.evaluations)
    assert "GPU-h/Mreq" in (tmp_path / "plan.md").read_text()


def test_planner_accepts_an_iterable_of_requests():
    reqs = list(synthetic_requests(60, 20.0, seed=1, lengths=FixedLengths(512, 64)))
    arrivals = [r.arrival_time_s for r in reqs]
    p = Planner(reqs, SLO_TEXT, rate_scale=2.0)
    assert p.info.count == 60
    a = p.evaluate("none", 1, 1)
    b = p.evaluate("none", 1, 1, rate_scale=2.0 + 1e-12)  # not cached: replays again from the same list
    assert a.values == pytest.approx(b.values)
    assert [r.arrival_time_s for r in reqs] == arrivals  # the caller's requests are not rescaled in place


def test_cli_plan(tmp_path, capsys):
    rc = main(["plan", "--trace", str(SAMPLE), "--slo", SLO_TEXT, "--methods", "none,h2o:budget=512,window=32",
               "--limit", "80", "--rate-scale", "8", "--tp", "1", "--max-rate-config", "2x1", "--rate-tol", "0.1",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| none | ok |" in out and "h2o:budget=512,window=32" in out and "max req/s" in out
    assert (tmp_path / "plan.csv").read_text().startswith("method,status,tensor_parallel_size")
    assert main(["plan", "--trace", str(SAMPLE), "--slo", "ttft_ms:p95=1", "--out", str(tmp_path)]) == 2


def test_plan_jobs_two_processes_same_answer():
    a = plan_capacity(SAMPLE, SLO_TEXT, ["none", "fp8"], limit=60, rate_scale=8.0, jobs=1)
    b = plan_capacity(SAMPLE, SLO_TEXT, ["none", "fp8"], limit=60, rate_scale=8.0, jobs=2)
    key = lambda rows: [(r["method"], r["num_replicas"], r["tensor_parallel_size"]) for r in rows]  # noqa: E731
    assert key(a.rows) == key(b.rows)
    assert len(a.evaluations) == len(b.evaluations)


# -- docs/api.md: the documented example runs ------------------------------------------------------------
def test_api_doc_example_runs(monkeypatch):
    pytest.importorskip("pandas")
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/api.md has no python example"
    monkeypatch.chdir(REPO)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), ns)  # noqa: S102
