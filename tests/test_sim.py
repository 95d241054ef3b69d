"""Whole-simulation invariants on generated traces (conservation, clocks, determinism) and the physics of
the default roofline cost model at the two ends of the load range."""

from __future__ import annotations

import csv
import io
import json
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings

from kvsim import api
from kvsim.build import build_run
from kvsim.config import EngineConfig
from kvsim.cost.base import StepShape
from kvsim.engine.output_length import LengthSampler
from kvsim.metrics.collector import Recorder
from kvsim.workload.readers import write_trace

from conftest import TINY, FakeCost, examples, make_engine, make_request, run_sim, small_config
from test_fast_forward import requests, scenario_spec, scenarios


def simulate(reqs, cfg, method, fast_forward=True):
    """The run builder's wiring (as api.replay's), keeping the replicas and a timeline row for every step."""
    spec = scenario_spec(TINY, method, cfg)
    tl = io.StringIO()
    rec = Recorder(None, tl, timeline_interval_s=0.0, keep_rows=True)
    run = build_run(spec, [rec], LengthSampler(api.length_ratio_for(spec), spec.config.seed), fast_forward,
                    check_invariants=True)
    end = run.run(requests(reqs))
    timeline = list(csv.DictReader(io.StringIO(tl.getvalue())))
    return rec, run.replicas, run.sim, end, timeline


# -- conservation and clocks ---------------------------------------------------------------------------
#: found by hypothesis: SnapKV's request 1 is preempted late and its recompute (prompt + generated) can
#: never fit the pool; it used to stall the run, now it is rejected with kv_capacity
SNAPKV_RECOMPUTE = (
    [("0", 0.0, 30, 54, None), ("1", 0.0, 77, 53, None)],
    dict(num_gpu_blocks_override=30, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=160,
         scheduler="chunked", enable_chunked_prefill=True, enable_prefix_caching=False, num_replicas=1,
         router="round-robin", seed=0),
    "snapkv:budget=8,window=4",
)


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
@example(SNAPKV_RECOMPUTE)
def test_conservation_and_clocks(scenario):
    reqs, cfg, method = scenario
    rec, replicas, _, end, timeline = simulate(reqs, cfg, method)
    rows = rec.rows
    completed = [r for r in rows if r["status"] == "completed"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    # request conservation: every arrival is completed or rejected, exactly once
    assert rec.num_arrivals == len(reqs) == len(rows)
    assert rec.completed == len(completed) and sum(rec.rejected.values()) == len(rejected)
    assert sorted(r["request_id"] for r in rows) == sorted(r[0] for r in reqs)
    # token conservation: each request generated exactly its (possibly method-scaled) output length,
    # and the totals are the sums over the rows
    for r in completed:
        assert r["output_tokens"] == round(r["output_length_ratio"] * r["trace_output_tokens"]) >= 1
        if method == "none":
            assert r["output_tokens"] == r["trace_output_tokens"]
    assert rec.output_tokens == sum(r["output_tokens"] for r in completed)
    assert rec.prompt_tokens == sum(r["prompt_tokens"] for r in completed)
    # KV blocks: everything free at the end, nothing left queued
    for r in replicas:
        assert not r.busy and r.pending is None
        assert r.kv.pool.num_free == r.kv.pool.num_blocks and r.kv.pool.num_used == 0
        r.kv.pool.check([])
        assert r.outstanding_tokens == 0
    assert rec.peak_kv_blocks <= replicas[0].kv.pool.num_blocks
    # clocks
    for r in completed:
        assert r["arrival_time_s"] <= r["first_token_time_s"] <= r["finish_time_s"] <= end
        assert r["ttft_ms"] >= 0 and r["tpot_ms"] >= 0 and r["e2el_ms"] >= r["ttft_ms"]
    last: dict[str, float] = {}
    for row in timeline:
        t = float(row["time_s"])
        assert t >= last.get(row["replica"], 0.0), (row, last)
        last[row["replica"]] = t
        assert 0 <= int(row["kv_blocks_used"]) <= int(row["kv_blocks_total"])


# -- determinism -------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_outputs(tmp_path):
    from kvsim.cli import main

    trace = tmp_path / "trace.jsonl"
    write_trace([make_request(i, arrival=0.013 * i, prompt=40 + 17 * (i % 5), output=20 + 11 * (i % 7))
                 for i in range(60)], trace)
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        # gear has a sampled output-length ratio (published default): the seed decides every length
        rc = main(["replay", str(trace), "--out", str(out), "--quiet", "--method", "gear", "--seed", "7",
                   "--num-gpu-blocks-override", "300", "--num-replicas", "2", "--no-profile"])
        assert rc == 0
        outs.append(out)
    a, b = outs
    assert (a / "requests.csv").read_bytes() == (b / "requests.csv").read_bytes()
    assert (a / "timeline.csv").read_bytes() == (b / "timeline.csv").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa["sim"].pop("wall_s")
    sb["sim"].pop("wall_s")
    assert sa == sb
    assert sa["completed"] == 60 and sa["mean_output_length_change"] != 0.0


def test_different_seed_changes_sampled_lengths():
    reqs = [make_request(i, arrival=0.01 * i, prompt=32, output=40) for i in range(30)]
    res = [api.replay(list(reqs), model=TINY, method="gear", config=small_config(num_gpu_blocks_override=400, seed=s))
           for s in (1, 2)]
    assert [r["output_tokens"] for r in res[0].rows] != [r["output_tokens"] for r in res[1].rows]


# -- physics on the default roofline -------------------------------------------------------------------------
def roofline_spec(**cfg):
    spec = api.make_spec("llama-3.1-8b", "h100", "none", EngineConfig(**cfg), auto_profile=False)
    cost = api.make_cost(spec)
    assert cost.name == "roofline"
    return spec, cost


def test_low_load_latency_is_one_step():
    prompt, output = 512, 128
    spec, cost = roofline_spec()
    reqs = [make_request(i, arrival=10.0 * i, prompt=prompt, output=output) for i in range(5)]
    res = api.replay(reqs, spec=spec)
    prefill = cost.step_time_s(StepShape(0, 0, [(prompt, prompt, True)]))
    # a lone request's decode steps attend to prompt + 1 ... prompt + output - 1 tokens
    decode = [cost.decode_step_time_s(1, prompt + k) for k in range(1, output)]
    for r in res.rows:
        assert r["ttft_ms"] == pytest.approx(prefill * 1e3, rel=0.01)
        assert r["tpot_ms"] == pytest.approx(sum(decode) / len(decode) * 1e3, rel=0.01)
        assert r["tpot_ms"] == pytest.approx(cost.decode_step_time_s(1, prompt + output // 2) * 1e3, rel=0.01)
        assert r["num_preemptions"] == 0


def test_overload_output_throughput_saturates_at_the_roofline_limit():
    """2048 requests at t=0, short prompts and long outputs, so decode dominates.

    Bound (an upper limit on output tokens/s, from the cost model alone):
    - at most B = min(max_num_seqs, sequences whose final KV fits the pool) decode together;
    - a decode step of b <= B sequences with KV sums S costs at least b/B of a full-batch step at the
      same per-sequence contexts: the dense part (weights read once per step) and the attention intercept
      only get cheaper per sequence as the batch grows, the attention slope (KV bytes read) is per token;
    - prefill chunks only add time to a step;
    so every generated token costs at least decode_step_time_s(B, B x c) / B, where c is the context it
    attends to (prompt + k for its k-th decode step). Summed over a request's life, the best possible
    throughput is B / mean_k decode_step_time_s(B, B x (prompt + k)).
    The simulation must stay below that, and within 15 % of it (the slack: prefill steps, the two waves
    of 1024 starting and ending, the first token of each request coming from a prefill step).
    """
    prompt, output, n = 16, 384, 2048
    spec, cost = roofline_spec()
    cfg = spec.config
    blocks = api.build_replicas(spec, [Recorder()])[0].kv.num_blocks
    per_req_blocks = -(-(prompt + output - 1) // cfg.block_size)
    B = min(cfg.max_num_seqs, blocks // per_req_blocks)
    assert B == cfg.max_num_seqs == 1024            # this workload is batch-limited, not KV-limited
    per_token = [cost.decode_step_time_s(B, B * (prompt + k)) / B for k in range(1, output)]
    limit = 1.0 / (sum(per_token) / len(per_token))
    res = api.replay([make_request(i, 0.0, prompt, output) for i in range(n)], spec=spec)
    s = res.summary
    assert s["completed"] == n and s["num_preemptions"] == 0 and s["peak_batch_size"] == B
    assert s["output_throughput"] <= limit
    assert s["output_throughput"] >= 0.85 * limit, (s["output_throughput"], limit)


# -- exact SimPy log of a preemption (FakeCost) ---------------------------------------------------------------
@pytest.mark.parametrize("fast_forward", [False, True])
def test_preemption_event_log_through_simpy(fast_forward):
    """3 blocks of 4 tokens: A and B prefill together, B is preempted when A needs its 2nd block and then
    recomputes its 5 tokens after A finishes. Times in 1/16384 s: step = 256 + 16 x tokens + decode KV."""
    U = Fraction(1, 16384)
    e = make_engine(num_blocks=3, max_num_batched_tokens=64, fast_forward=fast_forward)
    run_sim([e], [make_request("A", 0.0, 4, 6), make_request("B", 0.0, 4, 3)])
    # [0,384)      A 4 + B 4 prefill               -> A1, B1 (3 blocks: 1 + 1, 1 free)
    # [384,661)    A decode KV 5 (takes the free block); B preempted (needs a block, newest) -> A2
    # [661,939)    A KV 6 -> A3 ;  [939,1218) A KV 7 -> A4 ;  [1218,1498) A KV 8 -> A5
    # [1498,1779)  A KV 9 (3rd block: the last free one) -> A6, A done (all 3 blocks free)
    # [1779,2115)  B recompute prefill 5 (prompt 4 + 1 generated) -> B2
    # [2115,2393)  B decode KV 6 -> B3, done
    rows = {r["request_id"]: r for r in e.rec.rows}
    assert rows["A"]["finish_time_s"] == float(1779 * U) and rows["A"]["num_preemptions"] == 0
    assert rows["B"]["first_token_time_s"] == float(384 * U)
    assert rows["B"]["finish_time_s"] == float(2393 * U) and rows["B"]["num_preemptions"] == 1
    assert rows["B"]["tpot_ms"] == float((2393 - 384) * U / 2) * 1e3
    shapes = [(c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) for c in e.cost.calls]
    assert shapes == [(0, 0, [(4, 4, True), (4, 4, True)]), (1, 5, []), (1, 6, []), (1, 7, []), (1, 8, []),
                      (1, 9, []), (0, 0, [(5, 5, True)]), (1, 6, [])]
    assert e.rec.num_steps == 8
    assert e.sched.num_preemptions == 1 and e.pool.num_free == 3
    assert isinstance(e.cost, FakeCost)
