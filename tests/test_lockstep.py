"""Data-parallel ranks of an expert-parallel MoE model step together (kvsim.engine.sim lockstep groups):
a hand-computed two-rank event log with FakeCost, the wiring in api.build_replicas, and conservation
(check_invariants after every step) on generated traces."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings

from kvsim import api
from kvsim.engine.sim import Simulation

from conftest import TINY, FakeCost, examples, make_engine, make_request, run_sim, small_config
from test_fast_forward import requests, scenarios


class FakeMoECost(FakeCost):
    """FakeCost plus moe(T) = 1/32 + T/512 s for T > 0 (0 for T = 0), dyadic so clocks stay exact."""

    @staticmethod
    def moe_exact(T: int) -> Fraction:
        return Fraction(1, 32) + Fraction(T, 512) if T else Fraction(0)

    def moe_time_s(self, num_tokens: int) -> float:
        return float(self.moe_exact(num_tokens))


def lockstep_pair(**kw):
    engines = []
    for i in range(2):
        e = make_engine(replica_id=i, cost=FakeMoECost(), fast_forward=False,
                        recorder=engines[0].rec if engines else None, **kw)
        e.replica.lockstep_group = 0
        engines.append(e)
    return engines


def test_two_rank_lockstep_exact_event_log():
    """Rank 0 gets A (prompt 16, 2 tokens), rank 1 gets B (prompt 8, 3 tokens), both at t = 0.
    Group step = max over ranks of (own + moe(T_max) - moe(T_rank)); an idle rank waits moe(T_max)."""
    e0, e1 = lockstep_pair()
    moe, step = FakeMoECost.moe_exact, FakeCost.exact
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3)],
            router="least-outstanding-tokens")
    # step 1 at 0: rank 0 prefills 16 (own 1/64 + 16/1024 = 32/1024), rank 1 prefills 8 (own 24/1024) and
    # pads its MoE layers to 16 tokens: 24/1024 + moe(16) - moe(8) = 40/1024; both end at 40/1024
    t1 = max(step(16), step(8) + moe(16) - moe(8))
    assert t1 == Fraction(40, 1024)
    # step 2: both decode one token (T = 1 each): A attends 17 KV tokens, B 9; A finishes
    t2 = t1 + max(step(1, 17), step(1, 9))
    # step 3: rank 0 is idle and runs a dummy batch (moe(1) = 17/512), rank 1 decodes B over 10 KV tokens
    assert moe(1) > step(1, 10)
    t3 = t2 + moe(1)
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert rows["A"]["first_token_time_s"] == rows["B"]["first_token_time_s"] == float(t1)
    assert rows["A"]["finish_time_s"] == float(t2)
    assert rows["B"]["finish_time_s"] == float(t3)
    assert rows["B"]["tpot_ms"] == float((t3 - t1) / 2) * 1e3
    # each rank's own step shapes (its cost model is asked for its own batch only)
    shapes0 = [(c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) for c in e0.cost.calls]
    shapes1 = [(c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) for c in e1.cost.calls]
    assert shapes0 == [(0, 0, [(16, 16, True)]), (1, 17, [])]
    assert shapes1 == [(0, 0, [(8, 8, True)]), (1, 9, []), (1, 10, [])]
    assert e0.rec.num_steps == 5
    for e in (e0, e1):
        assert e.pool.num_free == e.pool.num_blocks and e.replica.outstanding_tokens == 0


def test_independent_ranks_do_not_wait_for_each_other():
    """The same two requests on two independent replicas (no group): B's prefill ends at its own 24/1024."""
    e0 = make_engine(replica_id=0, cost=FakeMoECost())
    e1 = make_engine(replica_id=1, cost=FakeMoECost(), recorder=e0.rec)
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3)],
            router="least-outstanding-tokens")
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert rows["B"]["first_token_time_s"] == float(FakeCost.exact(8))
    assert rows["A"]["first_token_time_s"] == float(FakeCost.exact(16))


def test_a_request_arriving_mid_step_joins_the_next_group_step_on_the_least_loaded_rank():
    e0, e1 = lockstep_pair()
    moe, step = FakeMoECost.moe_exact, FakeCost.exact
    # A (16 + 2 = 18 outstanding) on rank 0, B (8 + 3 = 11) on rank 1, C at 1/64 s: rank 1 (11 < 18)
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3),
                       make_request("C", 2.0 ** -6, 4, 1)], router="least-outstanding-tokens")
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert rows["C"]["replica"] == 1
    t1 = Fraction(40, 1024)
    # step 2: rank 0 decodes A (T = 1), rank 1 decodes B and prefills C (T = 5): rank 0 pads to 5 tokens
    t2 = t1 + max(step(1, 17) + moe(5) - moe(1), step(5, 9))
    assert rows["C"]["first_token_time_s"] == rows["C"]["finish_time_s"] == float(t2)
    assert rows["A"]["finish_time_s"] == float(t2)


def test_group_ranks_must_not_fast_forward():
    e0, e1 = lockstep_pair()
    e1.replica.fast_forward = True
    with pytest.raises(ValueError, match="fast_forward=False"):
        run_sim([e0, e1], [])


TINY_MOE = dataclasses.replace(TINY, name="tiny-moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def test_build_replicas_groups_moe_expert_parallel_ranks_only():
    cfg = small_config(data_parallel_size=2, num_replicas=2, enable_expert_parallel=True)
    spec = api.make_spec(TINY_MOE, "h100", None, cfg, auto_profile=False)
    reps = api.build_replicas(spec, None)
    assert [r.lockstep_group for r in reps] == [0, 0, 1, 1]
    assert not any(r.fast_forward for r in reps)
    assert reps[0].cost.moe_time_s(8) > 0
    # dense model with DP, or MoE without expert parallelism: independent replicas, as before
    dense = api.make_spec(TINY, "h100", None, cfg, auto_profile=False)
    assert [r.lockstep_group for r in api.build_replicas(dense, None)] == [None] * 4
    no_ep = api.make_spec(TINY_MOE, "h100", None, small_config(data_parallel_size=2), auto_profile=False)
    assert all(r.lockstep_group is None and r.fast_forward for r in api.build_replicas(no_ep, None))


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_lockstep_conservation(scenario):
    """Generated traces on MoE DP x EP groups (1-3 replicas of 2 ranks), every method, both schedulers:
    block conservation is checked after every step of every rank; every request ends exactly once."""
    reqs, cfg, method = scenario
    cfg = dict(cfg, data_parallel_size=2, enable_expert_parallel=True)
    spec = api.make_spec(TINY_MOE, "h100", method, small_config(**cfg), auto_profile=False)
    res = api.replay(requests(reqs), spec=spec, check_invariants=True, keep_rows=True)
    rows = res.rows
    assert sorted(r["request_id"] for r in rows) == sorted(r[0] for r in reqs)
    completed = [r for r in rows if r["status"] == "completed"]
    s = res.summary
    assert s["num_requests"] == len(reqs)
    for r in completed:
        assert r["arrival_time_s"] <= r["first_token_time_s"] <= r["finish_time_s"]
        assert r["replica"] in range(2 * cfg["num_replicas"])
    # group ranks never fast-forward, so the option changes nothing
    stepped = api.replay(requests(reqs), spec=spec, fast_forward=False, keep_rows=True)
    assert sorted(stepped.rows, key=lambda r: r["request_id"]) == sorted(rows, key=lambda r: r["request_id"])
