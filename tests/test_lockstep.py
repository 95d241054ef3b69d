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


def test_a_request_arriving_mid_step_joins_the_next_group_step_on_the_rank_vllm_picks():
    """vLLM's DP balancer (lowest 4 x waiting + running, ties to rank 0, one waiting request added locally per
    pick between 100 ms snapshots): A -> rank 0 (0 vs 0), B -> rank 1 (4 vs 0), C at 1/64 s -> rank 0
    (4 vs 4, no new snapshot yet), although rank 0 holds more tokens (A: 16 + 2 against B: 8 + 3)."""
    e0, e1 = lockstep_pair()
    moe, step = FakeMoECost.moe_exact, FakeCost.exact
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3),
                       make_request("C", 2.0 ** -6, 4, 1)], router="least-outstanding-tokens")
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert [rows[k]["replica"] for k in "ABC"] == [0, 1, 0]
    t1 = Fraction(40, 1024)
    # step 2: rank 0 decodes A (KV 17) and prefills C (T = 5); rank 1 decodes B (KV 9, T = 1) padded to 5
    t2 = t1 + max(step(5, 17), step(1, 9) + moe(5) - moe(1))
    assert t2 - t1 == Fraction(409, 16384)  # rank 1's padded step is the longer
    assert rows["C"]["first_token_time_s"] == rows["C"]["finish_time_s"] == float(t2)
    assert rows["A"]["finish_time_s"] == float(t2)
    # step 3: rank 0 is idle (dummy batch, moe(1)); rank 1 decodes B's last token
    assert rows["B"]["finish_time_s"] == float(t2 + max(step(1, 10), moe(1)))


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


# -- vLLM's DP balancer, by hand --------------------------------------------------------------------
class _Sched:
    def __init__(self, waiting, running):
        self.waiting, self.running = [None] * waiting, [None] * running


class _Rank:
    def __init__(self, rid, waiting, running):
        self.id, self.scheduler = rid, _Sched(waiting, running)

    def set(self, waiting, running):
        self.scheduler = _Sched(waiting, running)


def test_vllm_dp_balancer_scores_waiting_four_times_running():
    from kvsim.engine.cluster import VllmDPBalancer, request_counts

    a, b = _Rank(0, 1, 0), _Rank(1, 0, 3)
    bal = VllmDPBalancer()
    assert bal.pick([a, b], 0.0) is b                     # 4 x 1 + 0 = 4 > 4 x 0 + 3 = 3
    # between snapshots the front end adds one waiting request to the rank it chose: b is now 4 x 1 + 3 = 7
    assert bal.pick([a, b], 0.05) is a                    # 4 < 7; a's view is now 8
    assert bal.pick([a, b], 0.0999) is b                  # 7 < 8
    # 100 ms after the snapshot the counts are read again: a (2 waiting, 1 running) = 9, b (0, 5) = 5
    a.set(2, 1), b.set(0, 5)
    assert bal.pick([a, b], 0.1) is b
    assert request_counts(a) == (2, 1)
    # equal scores: the lowest rank (vLLM scans from eng_start_index = 0 with a strict <)
    c, d = _Rank(0, 0, 4), _Rank(1, 1, 0)
    assert VllmDPBalancer().pick([c, d], 0.0) is c
    # stats_interval_s = 0: every pick reads the current counts (no carried increments)
    live = VllmDPBalancer(stats_interval_s=0.0)
    e, f = _Rank(0, 0, 0), _Rank(1, 0, 0)
    assert [live.pick([e, f], t) for t in (0.0, 0.0, 0.0)] == [e, e, e]


def test_vllm_dp_balancer_rejects_a_bad_interval():
    from kvsim.engine.cluster import VllmDPBalancer

    with pytest.raises(ValueError, match="stats_interval_s = -0.1"):
        VllmDPBalancer(stats_interval_s=-0.1)
    with pytest.raises(ValueError, match="stats_interval_s = inf"):
        VllmDPBalancer(stats_interval_s=float("inf"))


def test_vllm_dp_router_sums_a_groups_counts_and_is_selectable():
    from kvsim.config import EngineConfig
    from kvsim.engine.cluster import VllmDPBalancer, make_router, request_counts
    from kvsim.engine.sim import LockstepGroup

    g = LockstepGroup(0, [_Rank(0, 1, 2), _Rank(1, 0, 3)])   # 1 waiting, 5 running: score 9
    solo = _Rank(2, 2, 0)                                      # score 8
    assert request_counts(g) == (1, 5)
    router = make_router("vllm-dp")
    assert isinstance(router, VllmDPBalancer)
    assert router.pick([g, solo], 0.0) is solo
    assert router.pick([g, solo], 0.01) is g                   # solo is now seen at 12 > 9
    assert EngineConfig(router="vllm-dp").validate().router == "vllm-dp"
