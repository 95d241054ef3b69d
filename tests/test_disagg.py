"""Disaggregated prefill/decode and the CPU KV tier (kvsim.engine.disagg, kvsim.engine.offload, kvsim.engine.kvlink).

Exact event logs of tiny scenarios computed by hand with FakeCost (a step costs 256 + 16 x tokens + decode KV
tokens units of U = 1/16384 s, tests/conftest.py) and a dyadic link: 1 MiB/s, so the 256 bytes of one TINY token
take 4 U on the wire; latency 8 U. Then the invariants each with a test (every byte sent is received once, no
request decodes before its KV arrived, conservation across both pools, fast-forward = stepping, determinism), the
infinitely-fast-link analytic test, and the wiring (options, outputs, errors).
"""

from __future__ import annotations

import csv
import io
import json
import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvsim import api
from kvsim.config import EngineConfig
from kvsim.cost.base import StepShape
from kvsim.engine.block_manager import BlockManager
from kvsim.engine.disagg import DisaggCluster, DisaggSimulation, PrefillReplica, transfer_bytes_fn
from kvsim.engine.kv_cache_manager import KVCacheManager
from kvsim.engine.kvlink import LinkLog, Port, book, layerwise_last_byte
from kvsim.engine.offload import CPUTier, attach_tier
from kvsim.engine.output_length import LengthSampler
from kvsim.engine.replica import Replica
from kvsim.engine.scheduler import Scheduler
from kvsim.errors import ConfigError, KvsimError
from kvsim.methods import parse_method
from kvsim.methods.base import LengthRatio
from kvsim.metrics.collector import Recorder
from kvsim.metrics.transfer import TRANSFER_COLUMNS, transfer_values
from kvsim.specs.links import INFINITE, LinkSpec, load_link

from conftest import TINY, FakeCost, examples, make_request, small_config
from test_fast_forward import assert_same, requests, scenario_spec, scenarios

U = Fraction(1, 16384)
#: 256 B (one TINY token) in 4 U, 8 U latency
LINK = LinkSpec("test", 256 / float(4 * U), float(8 * U), "test")


def t_(units) -> float:
    return float(Fraction(units) * U)


def recorder(tl=None):
    return Recorder(None, tl, timeline_interval_s=0.0, keep_rows=True, extra_columns=TRANSFER_COLUMNS,
                    extra_values=transfer_values)


def pd_cluster(rec, prefill_blocks=64, decode_blocks=64, link=LINK, mode="whole", method="none", budget=16,
               fast_forward=True, n_prefill=1, n_decode=1, log=None, prefix_caching=False, max_num_seqs=8):
    meth = parse_method(method)
    prefill, decode = [], []
    for i in range(n_prefill + n_decode):
        pool = BlockManager(prefill_blocks if i < n_prefill else decode_blocks, 4, prefix_caching)
        kv = KVCacheManager(pool, meth, TINY, 1)
        sched = Scheduler(kv, max_num_seqs, budget, True)
        if i < n_prefill:
            r = PrefillReplica(i, sched, kv, FakeCost(), [rec], 4096, False)
            r.tp = 1
            prefill.append(r)
        else:
            decode.append(Replica(i, sched, kv, FakeCost(), [rec], 4096, fast_forward))
    return DisaggCluster(prefill, decode, link, mode, TINY.num_layers, 1, transfer_bytes_fn(meth, TINY, 1), log,
                         "round-robin", "round-robin")


def run_pd(cluster, rec, trace, check=True):
    sim = DisaggSimulation(cluster, [rec], LengthSampler(LengthRatio(source="test"), 0), check)
    end = sim.run(list(trace))
    return sim, end


def expect(row, arrival, first, finish, output):
    arrival, first, finish = Fraction(arrival), Fraction(first), Fraction(finish)
    assert row["status"] == "completed"
    assert (row["arrival_time_s"], row["first_token_time_s"], row["finish_time_s"]) == (float(arrival), float(first), float(finish))
    assert row["output_tokens"] == output
    assert row["ttft_ms"] == float(first - arrival) * 1e3
    assert row["e2el_ms"] == float(finish - arrival) * 1e3


TRACE = [make_request("R0", 0.0, prompt=8, output=3), make_request("R1", 0.0, prompt=20, output=2)]


# -- exact event logs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_forward", [False, True])
def test_whole_transfer_exact_event_log(fast_forward):
    rec = recorder()
    log = LinkLog(1.0)
    c = pd_cluster(rec, fast_forward=fast_forward, log=log)
    _, end = run_pd(c, rec, TRACE)
    # prefill instance 0 (budget 16):
    #   [0, 512)      R0 8 (prompt done) + R1 8          256 + 16 x 16        -> R0 handed off at 512
    #   [512, 960)    R1 12 (prompt done)                256 + 16 x 12        -> R1 handed off at 960
    # decode instance 1:
    #   512  takes 2 blocks for R0; transfer 8 x 256 B: wire [512, 544), lands 552
    #   [552, 832)    R0 recomputes its last prompt token over its 8 received tokens: 256 + 16 + 8 -> token 1
    #   [832, 1113)   R0 decode (KV 9); R1 handed off at 960 cuts a stretch here
    #   1113 takes 5 blocks for R1; transfer 20 x 256 B: wire [1113, 1193), lands 1201
    #   [1113, 1395)  R0 decode (KV 10) -> done
    #   [1395, 1687)  R1 first step over its 20 received tokens: 256 + 16 + 20 -> token 1
    #   [1687, 1980)  R1 decode (KV 21) -> done
    rows = {r["request_id"]: r for r in rec.rows}
    expect(rows["R0"], 0, 832 * U, 1395 * U, 3)
    expect(rows["R1"], 0, 1687 * U, 1980 * U, 2)
    assert end == t_(1980)
    assert {k: rows["R0"][k] for k in TRANSFER_COLUMNS[:3]} == {
        "kv_transfer_bytes": 2048.0, "kv_transfer_time_s": t_(552) - t_(512), "kv_transfer_link_s": t_(552) - t_(512)}
    assert rows["R1"]["kv_transfer_time_s"] == t_(1201) - t_(960)
    assert rows["R1"]["kv_transfer_link_s"] == t_(1201) - t_(1113)
    x0, x1 = c.transfers
    assert (x0.alloc_s, x0.start_s, x0.sent_s, x0.ready_s) == (t_(512), t_(512), t_(544), t_(552))
    assert (x1.handoff_s, x1.alloc_s, x1.start_s, x1.sent_s, x1.ready_s) == (t_(960), t_(1113), t_(1113), t_(1193), t_(1201))
    shapes = [(s.num_decode_seqs, s.decode_kept_tokens, s.prefill_chunks) for s in c.decode[0].cost.calls]
    if not fast_forward:  # a cut stretch had costed its later steps already
        assert shapes == [(1, 8, []), (1, 9, []), (1, 10, []), (1, 20, []), (1, 21, [])]
    assert [(s.prefill_chunks) for s in c.prefill[0].cost.calls] == [[(8, 8, True), (8, 8, False)], [(12, 20, True)]]
    # the send port carried both caches, and nothing else
    assert log.bytes["pd_send"] == log.bytes["pd_recv"] == 2048 + 5120
    assert log.busy_s["pd_send"] == pytest.approx(float(112 * U), abs=1e-15)
    # the prefill instance freed each prompt's blocks once it had landed on the decode instance
    for r in c.replicas:
        assert r.kv.pool.num_used == 0 and not r.busy


@pytest.mark.parametrize("fast_forward", [False, True])
def test_layerwise_transfer_exact_event_log(fast_forward):
    """Layer-wise: the decode instance is told when the last prefill step starts and each of TINY's 2 layers
    leaves once that step has computed it."""
    rec = recorder()
    c = pd_cluster(rec, mode="layerwise", fast_forward=fast_forward)
    run_pd(c, rec, TRACE)
    # R0: last step [0, 512): layers ready at 256 and 512, 1024 B (16 U) each; decode blocks taken at 0:
    #     last byte at max(0 v 256 + 2 x 16, 512 + 16) = 528, lands 536
    # R1: last step [512, 960): layers at 736, 960, 2560 B (40 U) each; decode blocks at 512, the port free at 528:
    #     last byte at max(736 + 80, 960 + 40) = 1000, lands 1008
    # decode: [536, 816) R0 token 1 (256+16+8); [816, 1097) R0 KV 9 (the stretch cut at R1's landing);
    #         [1097, 1415) R0 KV 10 + R1's first step over 20: 256 + 32 + 30 -> R0 done, R1 token 1
    #         [1415, 1708) R1 KV 21 -> done
    rows = {r["request_id"]: r for r in rec.rows}
    expect(rows["R0"], 0, 816 * U, 1415 * U, 3)
    expect(rows["R1"], 0, 1415 * U, 1708 * U, 2)
    x0, x1 = c.transfers
    assert (x0.handoff_s, x0.alloc_s, x0.sent_s, x0.ready_s) == (0.0, 0.0, t_(528), t_(536))
    assert (x1.handoff_s, x1.alloc_s, x1.start_s, x1.sent_s, x1.ready_s) == (t_(512), t_(512), t_(528), t_(1000), t_(1008))
    # what the request waited after its prompt was done: the last layer's share and the latency
    assert rows["R0"]["kv_transfer_time_s"] == t_(536) - t_(512)
    assert rows["R1"]["kv_transfer_time_s"] == t_(1008) - t_(960)


@pytest.mark.parametrize("fast_forward", [False, True])
def test_decode_side_waits_for_blocks_first_come_first_served(fast_forward):
    """A decode pool of 6 blocks: R1's 20 received tokens (5 blocks) wait until R0 (2 blocks, growing to 3) is done;
    meanwhile the prefill instance keeps R1's prompt blocks."""
    rec = recorder()
    c = pd_cluster(rec, decode_blocks=6, fast_forward=fast_forward)
    run_pd(c, rec, TRACE)
    # as in the first log up to 1395, except R1's blocks: 6 - 3 held by R0 < 5 until R0 finishes at 1395
    #   1395 takes 5 blocks; wire [1395, 1475), lands 1483
    #   [1483, 1775) R1 first step over 20 -> token 1; [1775, 2068) KV 21 -> done
    rows = {r["request_id"]: r for r in rec.rows}
    expect(rows["R0"], 0, 832 * U, 1395 * U, 3)
    expect(rows["R1"], 0, 1775 * U, 2068 * U, 2)
    x1 = c.transfers[1]
    assert (x1.alloc_s, x1.ready_s) == (t_(1395), t_(1483))
    assert rows["R1"]["kv_transfer_time_s"] == t_(1483) - t_(960)


def test_compressed_cache_moves_its_kept_bytes():
    """What moves is the method's kept cache in its stored format: fp8 half the bytes (and half the wire time)."""
    for method, bpt in (("none", 256), ("fp8", 128)):
        rec = recorder()
        c = pd_cluster(rec, method=method)
        run_pd(c, rec, [make_request("R0", 0.0, prompt=8, output=2)])
        x = c.transfers[0]
        assert x.bytes == 8 * bpt
        assert x.sent_s - x.start_s == t_(Fraction(4 * 8 * bpt, 256))
    # an evicting method moves only the tokens it keeps once the prompt is prefilled
    m = parse_method("h2o:budget=24,window=8,impl=reference")
    assert transfer_bytes_fn(m, TINY, 1)(100) == 24 * 256
    kivi = parse_method("kivi:bits=2,group_size=8,residual_length=16")
    f = transfer_bytes_fn(kivi, TINY, 1)
    assert f(64) == 64 * kivi.bytes_per_token(TINY, 1) + kivi.extra_bytes_per_seq(TINY, 1)
    # and with tensor parallelism every decode GPU's shard
    assert transfer_bytes_fn(parse_method("none"), TINY, 2)(10) == 10 * TINY.kv_bytes_per_token(tensor_parallel_size=2) * 2


# -- the CPU tier -----------------------------------------------------------------------------------------------
def tier_engine(rec, cpu_blocks, method="none", gpu_blocks=4, fast_forward=True):
    meth = parse_method(method)
    pool = BlockManager(gpu_blocks, 4, True)
    kv = KVCacheManager(pool, meth, TINY, 1)
    sched = Scheduler(kv, 8, 64, True)
    r = Replica(0, sched, kv, FakeCost(), [rec], 4096, fast_forward)
    block_bytes = 4 * meth.bytes_per_token(TINY, 1)
    tier = attach_tier(r, CPUTier(cpu_blocks * block_bytes, block_bytes, LINK, 1, LinkLog(1.0)))
    return r, tier


def run_one(replicas, rec, trace):
    from kvsim.engine.cluster import make_router
    from kvsim.engine.sim import Simulation

    sim = Simulation(replicas, make_router("round-robin"), [rec], LengthSampler(LengthRatio(source="t"), 0), True)
    return sim.run(list(trace))


TIER_TRACE = [
    make_request("A", 0.0, prompt=8, output=1, prefix_hashes=[1, 2], hash_block_tokens=4),
    make_request("B", t_(512), prompt=16, output=1, prefix_hashes=[11, 12, 13, 14], hash_block_tokens=4),
    make_request("C", t_(2048), prompt=8, output=2, prefix_hashes=[1, 2], hash_block_tokens=4),
]


@pytest.mark.parametrize("fast_forward", [False, True])
@pytest.mark.parametrize("method,block_units", [("none", 16), ("fp8", 8)])
def test_cpu_tier_exact_event_log(fast_forward, method, block_units):
    """A 4-block GPU pool: B evicts A's prompt blocks from the GPU; C, with A's prompt, loads the block it may hit
    from the CPU tier instead of recomputing it. An fp8 block is half the bytes, so half the PCIe time."""
    rec = recorder()
    r, tier = tier_engine(rec, cpu_blocks=16, method=method, fast_forward=fast_forward)
    run_one([r], rec, TIER_TRACE)
    b = block_units
    # [0, 384)      A prefill 8 -> done; blocks 1, 2 stored at the next step boundary (384): D2H one after the other
    # [512, 1024)   B prefill 16 (takes the 4 blocks: A's cached blocks leave the GPU) -> done; 11..14 stored at 1024
    # 2048          C: no GPU hit; the tier holds block 1 (a hit may cover (8 - 1) // 4 = 1 block): 1 block H2D
    #               [2048, 2048 + b), lands 8 U later; C waits outside the batch
    # [2048+b+8, +320)   C prefill of its last 4 tokens (256 + 64) -> token 1; then decode KV 9 (281) -> done
    start = 2048 + b + 8
    rows = {x["request_id"]: x for x in rec.rows}
    expect(rows["A"], 0, 384 * U, 384 * U, 1)
    expect(rows["C"], 2048 * U, (start + 320) * U, (start + 320 + 281) * U, 2)
    assert rows["C"]["prefix_hit_tokens_cpu"] == 4 and rows["C"]["prefix_hit_tokens"] == 0
    assert rows["C"]["kv_onload_bytes"] == tier.block_bytes
    assert rows["A"]["kv_offload_bytes"] == 2 * tier.block_bytes and rows["B"]["kv_offload_bytes"] == 4 * tier.block_bytes
    assert (tier.stored_blocks, tier.loaded_blocks, tier.evicted_blocks) == (6, 1, 0)
    assert tier.d2h.free_s == t_(1024 + 4 * b) and tier.h2d.free_s == t_(2048 + b)
    assert [c.prefill_chunks for c in r.cost.calls][-2:] == [[(4, 8, True)], []]


def test_cpu_tier_evicts_least_recently_used_and_then_misses():
    """A tier of 4 blocks: B's four blocks push A's out (least recently used first), so C recomputes its prompt."""
    rec = recorder()
    r, tier = tier_engine(rec, cpu_blocks=4)
    run_one([r], rec, TIER_TRACE)
    rows = {x["request_id"]: x for x in rec.rows}
    expect(rows["C"], 2048 * U, (2048 + 384) * U, (2048 + 384 + 281) * U, 2)
    assert rows["C"]["prefix_hit_tokens_cpu"] == 0
    # and C's own prompt blocks go back in, pushing out two of B's
    assert (tier.stored_blocks, tier.evicted_blocks, tier.loaded_blocks) == (8, 4, 0)


def test_cpu_tier_does_not_evict_a_block_being_loaded_or_stored():
    tier = CPUTier(2 * 1024, 1024, LINK, 1)
    seq = type("S", (), {"kv_offload_bytes": 0.0, "kv_onload_bytes": 0.0, "kv_pending": False, "prompt_tokens": 64})()
    tier._store("a", seq, 0.0)
    tier._store("b", seq, 0.0)
    tier._copy_out(0.0)  # a: [0, 16) U, b: [16, 32) U
    tier.now = t_(100)
    tier.load(seq, ["a"], 0, 1)  # reads a until 116 U
    tier._store("c", seq, t_(101))  # full: a is being read, b is the least recently used that may go
    assert list(tier._lru) == ["a", "c"] and tier.evicted_blocks == 1
    tier._store("d", seq, t_(102))  # a still being read, c not even copied yet: nothing may go
    assert tier.skipped_stores == 1 and "d" not in tier._lru


# -- links --------------------------------------------------------------------------------------------------------
def test_ports_serve_transfers_first_come_first_served():
    log = LinkLog(1.0)
    a, b = Port("pd_send", LINK, 1, log=log), Port("pd_recv", LINK, 1, log=log)
    x = book([a, b], 0.0, 1024, LINK, 1)
    y = book([a], 0.0, 512, LINK, 1)  # queues behind x on a
    assert (x.start_s, x.sent_s, x.ready_s) == (0.0, t_(16), t_(24))
    assert (y.start_s, y.sent_s, y.ready_s) == (t_(16), t_(24), t_(32))
    assert log.bytes == {"pd_send": 1536.0, "pd_recv": 1024.0}
    # two lanes twice the rate; the infinite link takes no time at all
    assert book([Port("g", LINK, 2)], 0.0, 1024, LINK, 2).sent_s == t_(8)
    z = book([Port("g", INFINITE, 1)], 1.5, 1e12, INFINITE, 1)
    assert (z.start_s, z.sent_s, z.ready_s) == (1.5, 1.5, 1.5)


def test_layerwise_last_byte_by_hand():
    # 4 layers, a step [0, 8): layers ready at 2, 4, 6, 8; 4 bytes per layer at 1 B/s
    f = layerwise_last_byte(0.0, 8.0, 4, 16.0, 1.0)
    assert f(0.0) == 18.0        # link-bound: first layer at 2, then 16 s of bytes
    f = layerwise_last_byte(0.0, 8.0, 4, 4.0, 1.0)
    assert f(0.0) == 9.0         # keeps up: the last layer's 1 s after the step
    assert f(5.0) == 9.0         # the destination exists from 5: 4 s of bytes from then, as late as the last layer
    assert f(7.0) == 11.0        # from 7: the 4 s of bytes end after the last layer's
    assert f(20.0) == 24.0       # everything computed long before: a whole transfer from 20


def test_link_specs_have_sources_and_the_issue_rates():
    rates = {n: load_link(n).bandwidth_bytes_per_s for n in ("rdma-100g", "rdma-200g", "rdma-400g")}
    assert rates == {"rdma-100g": 12.5e9, "rdma-200g": 25e9, "rdma-400g": 50e9}
    for name in ("nvlink-3", "nvlink-4", "pcie-gen4-x16", "pcie-gen5-x16", *rates):
        spec = load_link(name)
        assert set(spec.sources) >= {"bandwidth_gb_s", "latency_us"}
        assert all(len(v) > 20 for v in spec.sources.values())
    with pytest.raises(KvsimError, match="unknown link 'rdma-800g'"):
        load_link("rdma-800g")


# -- invariants on generated traces --------------------------------------------------------------------------------
@st.composite
def pd_scenarios(draw):
    reqs, cfg, method = draw(scenarios())
    cfg = dict(cfg, num_replicas=1)
    offload = cfg["enable_prefix_caching"] and draw(st.booleans())
    tr = dict(num_prefill_instances=draw(st.integers(1, 2)), num_decode_instances=draw(st.integers(1, 2)),
              kv_transfer_mode=draw(st.sampled_from(["whole", "layerwise"])),
              kv_transfer_link=draw(st.sampled_from(["infinite", "rdma-100g", "nvlink-4"])),
              kv_transfer_latency_us=draw(st.sampled_from([None, 0.0, 50.0, 2000.0])),
              prefill_router=draw(st.sampled_from(["round-robin", "least-outstanding-tokens"])),
              decode_router=draw(st.sampled_from(["round-robin", "least-outstanding-tokens"])))
    if offload:
        # a few blocks of TINY (1 KiB each at block size 4): evictions happen
        tr["kv_offloading_size"] = draw(st.sampled_from([4, 16, 256])) * 1024 * cfg["block_size"] / 4 / 2**30
        tr["kv_offload_latency_us"] = draw(st.sampled_from([None, 100.0]))
    return reqs, cfg, method, tr


def pd_run(reqs, cfg, method, tr, fast_forward):
    from kvsim.transfer import transfer_from_mapping

    spec = scenario_spec(TINY, method, cfg)
    spec.transfer = transfer_from_mapping(tr)
    return api.replay(requests(reqs), spec=spec, fast_forward=fast_forward, check_invariants=True, keep_rows=True)


def check_pd_invariants(res, reqs, spec_tr, method):
    rows = res.rows
    s = res.summary
    # request conservation across both pools: one row per arrival, completed or rejected with a reason
    assert sorted(r["request_id"] for r in rows) == sorted(r[0] for r in reqs)
    assert s["completed"] + s["rejected"] == len(reqs)
    t = s["kv_transfer"]
    # every byte sent is received once
    assert t["bytes_sent"] == t["bytes_received"]
    f = transfer_bytes_fn(parse_method(method), TINY, 1)
    for r in rows:
        if r["status"] != "completed":
            continue
        assert r["kv_transfer_bytes"] == f(r["prompt_tokens"])
        # no request decodes before its KV arrived: its first token comes a whole decode-side step after
        assert r["kv_transfer_time_s"] >= 0 and r["kv_transfer_link_s"] >= 0
        assert r["first_token_time_s"] > r["arrival_time_s"] + r["kv_transfer_time_s"]
        assert r["output_tokens"] >= 1


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pd_scenarios())
def test_pd_invariants_and_fast_forward_equals_stepping(scenario):
    reqs, cfg, method, tr = scenario
    ff = pd_run(reqs, cfg, method, tr, True)
    stepped = pd_run(reqs, cfg, method, tr, False)
    check_pd_invariants(ff, reqs, tr, method)
    assert_same(ff, stepped)
    assert stepped.summary["sim"]["fast_forward_stretches"] == 0


def test_every_transfer_lands_exactly_once_and_nothing_is_left_held():
    """Direct state checks after a busy run: each transfer record received its bytes once and landed after the
    prompt was done; prefill instances hold no sent prompt, decode instances wait for nothing, pools are empty."""
    rec = recorder()
    c = pd_cluster(rec, decode_blocks=16, n_prefill=2, n_decode=2, budget=32)
    trace = [make_request(f"R{i}", 0.002 * i, prompt=5 + 7 * (i % 6), output=1 + 5 * (i % 4)) for i in range(30)]
    sim, _ = run_pd(c, rec, trace)
    assert rec.completed == 30 and len(c.transfers) == 30
    for x in c.transfers:
        assert x.received == x.bytes > 0
        assert x.prefill_done_s <= x.alloc_s <= x.start_s < x.sent_s < x.ready_s
        assert x.decode_seq.first_token_s > x.ready_s
    for r in c.replicas:
        assert not r.busy and r.kv.pool.num_used == 0 and r.outstanding_tokens == 0
        r.kv.pool.check([])
    assert not sim.live


def test_same_seed_gives_identical_pd_outputs(tmp_path):
    from kvsim.cli import main
    from kvsim.workload.readers import write_trace

    trace = tmp_path / "trace.jsonl"
    write_trace([make_request(i, arrival=0.013 * i, prompt=40 + 17 * (i % 5), output=20 + 11 * (i % 7),
                              prefix_hashes=[i % 3, 100 + i % 2], hash_block_tokens=16) for i in range(60)], trace)
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert main(["replay", str(trace), "--out", str(out), "--quiet", "--method", "gear", "--seed", "7",
                     "--num-gpu-blocks-override", "300", "--no-profile", "--num-prefill-instances", "2",
                     "--num-decode-instances", "1", "--kv-transfer-link", "rdma-100g", "--kv-offload-gib", "0.5"]) == 0
        outs.append(out)
    a, b = outs
    for name in ("requests.csv", "timeline.csv", "links.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa["sim"].pop("wall_s")
    sb["sim"].pop("wall_s")
    assert sa == sb and sa["completed"] == 60 and sa["gpus"] == 3


# -- the analytic expectation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "kivi:bits=2", "h2o:budget=256,impl=reference"])
def test_infinitely_fast_link_one_of_each_equals_the_analytic_expectation(method):
    """1 prefill + 1 decode instance, an infinitely fast link, requests far apart: every request's TTFT is one
    prefill step of its prompt plus one decode step over the cache the method kept (the decode instance's first
    token), and each later token one decode step, exactly as the cost model prices them."""
    spec = api.make_spec("llama-3.1-8b", "h100", method, EngineConfig(max_num_batched_tokens=4096), auto_profile=False,
                         lengths="trace",  # the trace's output lengths, not a method's sampled ones
                         transfer={"num_prefill_instances": 1, "num_decode_instances": 1, "kv_transfer_link": "infinite"})
    cost = api.make_cost(spec)
    m = spec.method
    lengths = [(300, 40), (1000, 7), (2000, 1), (777, 65)]
    trace = [make_request(f"R{i}", 10.0 * i, prompt=p, output=o) for i, (p, o) in enumerate(lengths)]
    res = api.replay(trace, spec=spec, keep_rows=True, check_invariants=True)
    rows = {r["request_id"]: r for r in res.rows}
    for i, (p, o) in enumerate(lengths):
        prefill = cost.step_time_s(StepShape(0, 0, [(p, p, True)], 0))
        t = 10.0 * i + prefill
        kept = m.kept_tokens(p, p)
        t += cost.step_time_s(StepShape(1, kept, [], kept))  # the decode instance's first token
        first = t
        for c in range(p + 1, p + o):
            k = m.kept_tokens(p, c)
            t += cost.step_time_s(StepShape(1, k, [], k))
        r = rows[f"R{i}"]
        assert r["first_token_time_s"] == pytest.approx(first, rel=1e-12, abs=1e-12)
        assert r["finish_time_s"] == pytest.approx(t, rel=1e-12, abs=1e-12)
        assert r["kv_transfer_time_s"] == 0.0
    # against co-located serving on one GPU: the same prefill, then the same decode steps but one (vLLM's P/D
    # convention recomputes the last prompt token on the decode side)
    co = api.replay(trace, model="llama-3.1-8b", hardware="h100", method=method, lengths="trace",
                    config=EngineConfig(max_num_batched_tokens=4096), auto_profile=False, keep_rows=True)
    for r in co.rows:
        p = next(pp for pp, _ in lengths[int(r["request_id"][1:]):][:1])
        kept = m.kept_tokens(p, p)
        extra = cost.step_time_s(StepShape(1, kept, [], kept))
        assert rows[r["request_id"]]["ttft_ms"] == pytest.approx(r["ttft_ms"] + extra * 1e3, rel=1e-9)


@st.composite
def tier_scenarios(draw):
    reqs, cfg, method = draw(scenarios())
    if draw(st.booleans()):
        method = draw(st.sampled_from(["none", "fp8"]))  # the methods whose blocks are named by prefix hashes
    # a small GPU pool and a few recurring prompts: GPU prefix blocks get evicted and come back from the tier
    cfg = dict(cfg, enable_prefix_caching=True, num_gpu_blocks_override=draw(st.integers(8, 30)))
    fams = draw(st.integers(2, 6))
    reqs = [(rid, t, p, o, [7000 + 100 * (int(rid) % fams) + j for j in range(-(-p // 16))]) for rid, t, p, o, h in reqs]
    tr = {"kv_offloading_size": draw(st.sampled_from([2, 8, 64])) * 1024 * cfg["block_size"] / 4 / 2**30,
          "kv_offload_latency_us": draw(st.sampled_from([None, 30.0, 3000.0]))}
    return reqs, cfg, method, tr


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tier_scenarios())
# found by hypothesis: request 6 loaded the same two blocks twice before it ran (its GPU copies were evicted
# while it waited) and was credited both loads, so its GPU and CPU hits came to more than its prompt
@example(([("0", 0.0, 48, 1, [7000, 7001, 7002]), ("1", 0.0, 1, 1, [7100]), ("2", 0.0, 1, 1, [7000]),
           ("3", 0.0, 1, 1, [7100]), ("4", 0.0, 2, 23, [7000]), ("5", 0.0, 17, 1, [7100, 7101]),
           ("6", 0.0, 49, 1, [7000, 7001, 7002, 7003]), ("7", 0.0, 1, 41, [7100])],
          {"num_gpu_blocks_override": 10, "block_size": 8, "max_num_seqs": 1, "max_num_batched_tokens": 16,
           "max_model_len": 256, "enable_chunked_prefill": True, "enable_prefix_caching": True,
           "scheduler": "chunked", "num_replicas": 1, "router": "round-robin", "seed": 0, "async_scheduling": False},
          "fp8", {"kv_offloading_size": 2 * 1024 * 8 / 4 / 2**30, "kv_offload_latency_us": None}))
def test_cpu_tier_conservation_and_fast_forward_equals_stepping(scenario):
    reqs, cfg, method, tr = scenario
    ff = pd_run(reqs, cfg, method, tr, True)
    stepped = pd_run(reqs, cfg, method, tr, False)
    assert_same(ff, stepped)
    s = ff.summary
    assert s["completed"] + s["rejected"] == len(reqs)
    o = s["kv_offload"]
    # what came back is what was stored, a block at a time, and only hits a method that shares prefixes can have
    assert o["onloaded_bytes"] == o["loaded_blocks"] * o["block_bytes"]
    assert o["offloaded_bytes"] == o["stored_blocks"] * o["block_bytes"]
    assert o["stored_blocks"] - o["evicted_blocks"] <= o["cpu_blocks_per_instance"] * s["num_replicas"]
    if not o["prefix_sharing"]:
        assert o["stored_blocks"] == o["loaded_blocks"] == 0
    rows = [r for r in ff.rows if r["status"] == "completed"]
    assert sum(r["kv_onload_bytes"] for r in rows) <= o["onloaded_bytes"]
    assert all(r["prefix_hit_tokens_cpu"] + r["prefix_hit_tokens"] < r["prompt_tokens"] for r in rows)


# -- wiring: options, outputs, what a plain run keeps ----------------------------------------------------------------
def test_replay_outputs_of_a_pd_run_and_a_plain_one(tmp_path):
    from kvsim.cli import main
    from kvsim.metrics.collector import REQUEST_COLUMNS
    from kvsim.workload.readers import write_trace

    trace = tmp_path / "t.jsonl"
    write_trace([make_request(i, 0.05 * i, prompt=600, output=30) for i in range(40)], trace)
    cfg = tmp_path / "pd.yaml"
    cfg.write_text("model: llama-3.1-8b\nnum_prefill_instances: 1\nnum_decode_instances: 2\n"
                   "kv_transfer_link: rdma-200g\nkv-transfer-mode: layerwise\nkv_offload_gib: 1\n")
    assert main(["replay", str(trace), "--out", str(tmp_path / "pd"), "--quiet", "--no-profile", "--config", str(cfg)]) == 0
    assert main(["replay", str(trace), "--out", str(tmp_path / "plain"), "--quiet", "--no-profile"]) == 0
    pd, plain = tmp_path / "pd", tmp_path / "plain"
    s = json.loads((pd / "summary.json").read_text())
    assert s["gpus"] == 3 and s["num_replicas"] == 3
    t = s["kv_transfer"]
    assert (t["kv_transfer_link"], t["kv_transfer_mode"], t["transfers"]) == ("rdma-200g", "layerwise", 40)
    assert t["bytes_sent"] == t["bytes_received"] == 40 * 600 * 131072
    assert s["kv_offload"]["kv_offloading_size"] == 1.0
    assert s["transfer_options"]["num_decode_instances"] == 2
    header = (pd / "requests.csv").read_text().splitlines()[0].split(",")
    assert header == REQUEST_COLUMNS + list(TRANSFER_COLUMNS)
    links = list(csv.DictReader(open(pd / "links.csv")))
    assert {r["link"] for r in links} >= {"pd_send", "pd_recv"}
    assert all(0.0 <= float(r["utilization"]) <= 1.0 + 1e-9 for r in links)
    assert (pd / "timeline.png").stat().st_size > 0
    # a plain run: the engine's outputs, nothing added
    ps = json.loads((plain / "summary.json").read_text())
    assert not {"kv_transfer", "kv_offload", "transfer_options"} & set(ps)
    assert (plain / "requests.csv").read_text().splitlines()[0].split(",") == REQUEST_COLUMNS
    assert not (plain / "links.csv").exists()


def test_pd_defaults_and_ttft_includes_the_transfer():
    """A slow link shows in TTFT (vLLM's convention), not in TPOT; the same run over an infinitely fast link is
    faster to the first token by at least the wire time of each cache."""
    trace = [make_request(i, 1.0 * i, prompt=4000, output=20) for i in range(5)]
    out = {}
    for link in ("rdma-100g", "infinite"):
        spec = api.make_spec("llama-3.1-8b", "h100", "none", EngineConfig(), auto_profile=False,
                             transfer={"num_prefill_instances": 1, "num_decode_instances": 1, "kv_transfer_link": link})
        out[link] = {r["request_id"]: r for r in api.replay(trace, spec=spec, keep_rows=True).rows}
    wire_ms = 4000 * 131072 / 12.5e9 * 1e3
    for rid, r in out["rdma-100g"].items():
        assert r["ttft_ms"] - out["infinite"][rid]["ttft_ms"] >= wire_ms * (1 - 1e-9)
        assert r["tpot_ms"] == pytest.approx(out["infinite"][rid]["tpot_ms"], rel=1e-6)
        assert r["kv_transfer_link_s"] * 1e3 == pytest.approx(wire_ms)


def test_tensor_parallel_sides_and_profile_per_side():
    """Each side its own TP: its own cost, memory and KV bytes; the cache moves over min(tp_p, tp_d) lanes."""
    spec = api.make_spec("llama-3.1-8b", "h100", "none", EngineConfig(), auto_profile=False,
                         transfer={"num_prefill_instances": 2, "num_decode_instances": 1,
                                   "prefill_tensor_parallel_size": 1, "decode_tensor_parallel_size": 2})
    res = api.replay([make_request(0, 0.0, prompt=1000, output=5)], spec=spec, keep_rows=True)
    s = res.summary
    assert s["gpus"] == 2 * 1 + 1 * 2
    t = s["kv_transfer"]
    assert t["prefill_tensor_parallel_size"] == 1 and t["decode_tensor_parallel_size"] == 2
    # Llama-3.1-8B has 8 KV heads: at TP 2 each GPU holds 4, so the bytes over both GPUs equal TP 1's
    assert t["bytes_sent"] == 1000 * 131072
    assert t["kv_blocks_per_decode_instance"] > t["kv_blocks_per_prefill_instance"]
    assert res.rows[0]["kv_transfer_link_s"] == pytest.approx(1000 * 131072 / 50e9)  # one lane: the TP-1 side


def test_compare_takes_the_transfer_options(tmp_path):
    from kvsim.compare import compare

    trace = [make_request(i, 0.1 * i, prompt=300, output=10) for i in range(10)]
    rows = compare(trace, ["none", "fp8"], tmp_path, progress=False, model="llama-3.1-8b", auto_profile=False,
                   transfer={"num_prefill_instances": 1, "num_decode_instances": 1})
    assert [r["completed"] for r in rows] == [10, 10]
    s = json.loads((tmp_path / "fp8_implauto" / "summary.json").read_text())
    assert s["gpus"] == 2 and s["kv_transfer"]["bytes_sent"] == 10 * 300 * 131072 / 2


def test_published_comparison_runs_and_the_byte_counts_match():
    """python -m kvsim.pd_published (docs/disaggregation.md): every case has its source and both figures; the static
    cases (a cache's size, the bandwidth to move it) agree with the papers to 1 %."""
    from kvsim.pd_published import compare_published, format_markdown

    rows = compare_published(quick=True)
    assert len(rows) >= 12
    for r in rows:
        assert r["source"] and r["published"] and r["kvsim"] and r["setting"]
    static = [r for r in rows if r["case"].startswith("KV cache of") or r["case"].startswith("link bandwidth")]
    assert len(static) == 3 and all(r["agrees"] for r in static)
    assert "| case | published | kvsim |" in format_markdown(rows)


def test_a_prompt_dropped_on_the_prefill_side_takes_its_decode_side_along():
    """The scheduler drops a preempted request it can never run again (kvsim.engine.scheduler); on a prefill
    instance that request's decode side goes too: its router load and its place among the live sequences."""
    from kvsim.engine.sequence import Sequence

    rec = recorder()
    c = pd_cluster(rec)
    sim = DisaggSimulation(c, [rec], LengthSampler(LengthRatio(source="t"), 0), True)
    req = make_request("X", 0.0, prompt=8, output=4)
    p, d = c.prefill[0], c.decode[0]
    pseq, dseq = Sequence(req, 0, 1), Sequence(req, 0, 4)
    assert p.add(pseq) is None
    sim._accept(p, d, pseq, dseq, 0.0)
    assert (p.outstanding_tokens, d.outstanding_tokens) == (9, 12)
    p.scheduler.waiting.clear()
    p.scheduler.dropped.append((pseq, "kv_capacity"))
    p._reject_dropped()
    assert (p.outstanding_tokens, d.outstanding_tokens) == (0, 0)
    assert dict(rec.rejected) == {"kv_capacity": 1} and id(dseq) not in sim.live and id(pseq) in sim.live
