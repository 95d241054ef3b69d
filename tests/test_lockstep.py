"""Data-parallel ranks of an expert-parallel MoE model step together (kvsim.engine.sim lockstep groups):
a hand-computed two-rank event log with FakeCost, the wiring in api.build_replicas, and conservation
(check_invariants after every step) on generated traces."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings

from kvsim import api
from kvsim.engine.cluster import cudagraph_capture_sizes, dp_token_counts
from kvsim.engine.sim import Simulation

from conftest import TINY, FakeCost, examples, make_engine, make_request, run_sim, small_config
from test_fast_forward import requests, scenario_spec, scenarios


class FakeMoECost(FakeCost):
    """FakeCost plus a two-rank group's MoE: moe_group(N, S) = 1/32 + N/1024 + S/1024 s (N tokens gathered
    from the group, S the largest share; 0 for N = 0), and a rank's own moe(T) = moe_group(2T, T); dyadic
    so clocks stay exact."""

    @staticmethod
    def group_exact(N: int, S: int) -> Fraction:
        return Fraction(1, 32) + Fraction(N, 1024) + Fraction(S, 1024) if N else Fraction(0)

    @classmethod
    def moe_exact(cls, T: int) -> Fraction:
        return cls.group_exact(2 * T, T)

    def moe_time_s(self, num_tokens: int) -> float:
        return float(self.moe_exact(num_tokens))

    def moe_group_time_s(self, gathered_tokens: int, largest_share: int) -> float:
        return float(self.group_exact(gathered_tokens, largest_share))


def lockstep_pair(**kw):
    engines = []
    for i in range(2):
        e = make_engine(replica_id=i, cost=FakeMoECost(), fast_forward=False,
                        recorder=engines[0].rec if engines else None, **kw)
        e.replica.lockstep_group = 0
        engines.append(e)
    return engines


def test_two_rank_lockstep_exact_event_log():
    """Rank 0 gets A (prompt 16, 2 tokens), rank 1 gets B (prompt 8, 3 tokens), both at t = 0. Capture sizes
    (max_num_seqs 8, max_num_batched_tokens 64): 1, 2, 4, 8, 16. Group step = max over ranks of
    (own - moe(T_rank) + moe_group(N, S)); an idle rank runs a 1-token dummy batch and waits moe_group."""
    e0, e1 = lockstep_pair()
    moe, group, step = FakeMoECost.moe_exact, FakeMoECost.group_exact, FakeCost.exact
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3)],
            router="least-outstanding-tokens")
    # step 1 at 0: rank 0 prefills 16, rank 1 prefills 8; both fit a CUDA graph, so both run 16 tokens:
    # N = 32, S = 16, moe_group = 32/1024 + 32/1024 + 16/1024 = 80/1024. Rank 0: own 32/1024, its own
    # moe(16) = 80/1024, ends at 32/1024; rank 1: own 24/1024 - moe(8) 56/1024 + 80/1024 = 48/1024
    assert group(32, 16) == moe(16) == Fraction(80, 1024) and moe(8) == Fraction(56, 1024)
    t1 = max(step(16) - moe(16) + group(32, 16), step(8) - moe(8) + group(32, 16))
    assert t1 == Fraction(48, 1024)
    # step 2: both decode one token (T = 1 each, graph size 1: N = 2, S = 1, = each rank's own moe(1));
    # A attends 17 KV tokens, B 9; A finishes
    assert group(2, 1) == moe(1)
    t2 = t1 + max(step(1, 17), step(1, 9))
    # step 3: rank 0 is idle (dummy batch of 1 token), rank 1 decodes B over 10 KV tokens: N = 2, S = 1
    assert group(2, 1) == Fraction(35, 1024) > step(1, 10)
    t3 = t2 + group(2, 1)
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


@pytest.mark.parametrize("prompt_a, first_token", [
    # rank 0 prefills 16 (graph size 16), rank 1 prefills 3 (graph size 4): both graphs, so both are padded
    # to 16: N = 32, S = 16, moe_group = 80/1024. Rank 0: 32/1024 - moe(16) 80/1024 + 80/1024 = 32/1024;
    # rank 1: own 19/1024 - moe(3) 41/1024 + 80/1024 = 58/1024
    (16, Fraction(58, 1024)),
    # rank 0 prefills 17, above the largest capture size (16): the step runs eager and unpadded, rank 1
    # keeps its graph size 4: N = 21, S = 17, moe_group = 32/1024 + 21/1024 + 17/1024 = 70/1024. Rank 0:
    # own 33/1024 - moe(17) 83/1024 + 70/1024 = 20/1024; rank 1: 19/1024 - 41/1024 + 70/1024 = 48/1024
    (17, Fraction(48, 1024)),
])
def test_dp_padding_in_cuda_graph_steps_only(prompt_a, first_token):
    """vLLM pads the ranks to the largest graph size only when every rank runs a CUDA graph: one more
    prompt token on rank 0 makes the group's step shorter, because rank 1 is no longer padded to it."""
    e0, e1 = lockstep_pair()
    run_sim([e0, e1], [make_request("A", 0.0, prompt_a, 1), make_request("B", 0.0, 3, 1)])
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert [rows[k]["replica"] for k in "AB"] == [0, 1]
    for k in "AB":
        assert rows[k]["first_token_time_s"] == rows[k]["finish_time_s"] == float(first_token)


def test_vllm_capture_sizes_and_dp_token_counts_by_hand():
    """vLLM 0.19 defaults (VllmConfig._set_cudagraph_sizes) and DP sizing (coordinate_batch_across_dp)."""
    s128 = cudagraph_capture_sizes(128, 2048)  # the DP2/EP2 case: largest min(256, 512, 2048) = 256
    assert s128 == [1, 2, 4] + list(range(8, 256, 8)) + [256] and len(s128) == 35
    assert cudagraph_capture_sizes(256, 8192)[-18:] == [248] + list(range(256, 513, 16))
    assert cudagraph_capture_sizes(8, 64) == [1, 2, 4, 8, 16]
    assert cudagraph_capture_sizes(1, 2048) == [1, 2]
    assert cudagraph_capture_sizes(128, 100) == [1, 2, 4] + list(range(8, 97, 8))
    assert dp_token_counts([30, 2], s128) == [32, 32]        # graphs: all padded to the largest graph size
    assert dp_token_counts([256, 1], s128) == [256, 256]
    assert dp_token_counts([1, 1], s128) == [1, 1]
    assert dp_token_counts([2048, 50], s128) == [2048, 56]   # eager: each keeps its own (graph-sized) count
    assert dp_token_counts([257, 1], s128) == [257, 1]
    assert dp_token_counts([300, 700], s128) == [300, 700]
    assert dp_token_counts([30, 2], []) == [30, 2]           # no CUDA graphs: never padded


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
    moe, group, step = FakeMoECost.moe_exact, FakeMoECost.group_exact, FakeCost.exact
    run_sim([e0, e1], [make_request("A", 0.0, 16, 2), make_request("B", 0.0, 8, 3),
                       make_request("C", 2.0 ** -6, 4, 1)], router="least-outstanding-tokens")
    rows = {r["request_id"]: r for r in e0.rec.rows}
    assert [rows[k]["replica"] for k in "ABC"] == [0, 1, 0]
    t1 = Fraction(48, 1024)
    # step 2: rank 0 decodes A (KV 17) and prefills C (T = 5, graph size 8); rank 1 decodes B (KV 9, T = 1)
    # padded to 8: N = 16, S = 8
    t2 = t1 + max(step(5, 17) - moe(5) + group(16, 8), step(1, 9) - moe(1) + group(16, 8))
    assert t2 - t1 == Fraction(617, 16384)  # rank 1's padded step is the longer
    assert rows["C"]["first_token_time_s"] == rows["C"]["finish_time_s"] == float(t2)
    assert rows["A"]["finish_time_s"] == float(t2)
    # step 3: rank 0 is idle (dummy batch of 1 token); rank 1 decodes B's last token: N = 2, S = 1
    assert rows["B"]["finish_time_s"] == float(t2 + max(step(1, 10), group(2, 1)))


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
    assert reps[0].cost.moe_time_s(8) == reps[0].cost.moe_group_time_s(16, 8)
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
    spec = scenario_spec(TINY_MOE, method, cfg)
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
