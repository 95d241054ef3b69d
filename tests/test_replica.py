"""Exact event logs, through the SimPy layer, of small scenarios computed by hand with FakeCost.

FakeCost: step = 1/64 + tokens/1024 + decode_kv_tokens/16384 seconds. Below every time is written in
units of 1/16384 s (a step costs 256 + 16 x tokens + decode KV tokens units), so the expected values are
exact and compared with ``==``. Blocks hold 4 tokens.
"""

from __future__ import annotations

import csv
import io
from fractions import Fraction

import pytest

from kvsim.metrics.collector import Recorder

from conftest import make_engine, make_request, run_sim

U = Fraction(1, 16384)


def recorder():
    tl = io.StringIO()
    return Recorder(None, tl, timeline_interval_s=0.0, keep_rows=True), tl


def timeline(tl: io.StringIO):
    rows = list(csv.DictReader(io.StringIO(tl.getvalue())))
    return [(float(r["time_s"]), int(r["replica"]), int(r["batch_size"]), int(r["num_waiting"]),
             int(r["kv_blocks_used"])) for r in rows]


def ms(t: Fraction) -> float:
    """A time as timeline.csv writes it (rounded to 1 ns)."""
    return round(float(t), 9)


def expect_row(row, arrival, first, finish, output):
    """Check a completed row against exact times (as Fractions), computed as the Recorder does."""
    arrival, first, finish = Fraction(arrival), Fraction(first), Fraction(finish)
    assert row["status"] == "completed"
    assert row["arrival_time_s"] == float(arrival)
    assert row["first_token_time_s"] == float(first)
    assert row["finish_time_s"] == float(finish)
    assert row["output_tokens"] == output
    assert row["ttft_ms"] == float(first - arrival) * 1e3
    assert row["e2el_ms"] == float(finish - arrival) * 1e3
    tpot = (finish - first) / (output - 1) if output > 1 else Fraction(0)
    assert row["tpot_ms"] == float(tpot) * 1e3


TRACE = [
    make_request("R0", arrival=0.0, prompt=8, output=3),
    make_request("R1", arrival=512 * U, prompt=20, output=2),   # arrives during R0's first decode step
    make_request("R2", arrival=1.0, prompt=4, output=1),        # alone, long after
]


@pytest.mark.parametrize("fast_forward", [False, True])
def test_chunked_scheduler_exact_event_log(fast_forward):
    rec, tl = recorder()
    e = make_engine(num_blocks=64, max_num_batched_tokens=16, fast_forward=fast_forward, recorder=rec)
    run_sim([e], TRACE)
    # step 1  [0, 384)      R0 prefill 8                  256 + 128            -> R0 token 1 at 384
    # step 2  [384, 665)    R0 decode (KV 9)              256 + 16 + 9         -> R0 token 2; R1 arrived at 512
    # step 3  [665, 1187)   R0 decode (KV 10) + R1 15     256 + 256 + 10       -> R0 token 3, R0 done
    # step 4  [1187, 1523)  R1 last chunk of 5            256 + 80             -> R1 token 1
    # step 5  [1523, 1816)  R1 decode (KV 21)             256 + 16 + 21        -> R1 token 2, R1 done
    # step 6  [1, 1 + 320)  R2 prefill 4                  256 + 64             -> R2 token 1, done
    rows = {r["request_id"]: r for r in rec.rows}
    expect_row(rows["R0"], 0, 384 * U, 1187 * U, 3)
    expect_row(rows["R1"], 512 * U, 1523 * U, 1816 * U, 2)
    expect_row(rows["R2"], 1, 1 + 320 * U, 1 + 320 * U, 1)
    assert [r["request_id"] for r in rec.rows] == ["R0", "R1", "R2"]
    shapes = [(c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) for c in e.cost.calls]
    assert shapes == [(0, 0, [(8, 8, True)]), (1, 9, []), (1, 10, [(15, 15, False)]), (0, 0, [(5, 20, True)]),
                      (1, 21, []), (0, 0, [(4, 4, True)])]
    # (time, replica, batch, waiting, kv blocks used) after every step
    assert timeline(tl) == [
        (ms(384 * U), 0, 1, 0, 2),
        (ms(665 * U), 0, 1, 1, 3),        # R0 holds 9 tokens; R1 queued
        (ms(1187 * U), 0, 1, 0, 4),       # R0 freed; R1 holds 15 tokens
        (ms(1523 * U), 0, 1, 0, 5),
        (ms(1816 * U), 0, 0, 0, 0),
        (ms(1 + 320 * U), 0, 0, 0, 0),
    ]
    assert rec.completed == 3 and rec.output_tokens == 6 and rec.num_steps == 6
    assert sorted(rec.itl._bv) == sorted([float(281 * U), float(522 * U), float(293 * U)])


@pytest.mark.parametrize("fast_forward", [False, True])
def test_prefill_first_scheduler_exact_event_log(fast_forward):
    rec, tl = recorder()
    e = make_engine(num_blocks=64, max_num_batched_tokens=32, prefill_first=True, fast_forward=fast_forward,
                    recorder=rec)
    run_sim([e], TRACE)
    # step 1  [0, 384)      R0 prefill 8                  256 + 128            -> R0 token 1
    # step 2  [384, 665)    R0 decode (KV 9)              256 + 16 + 9         -> R0 token 2; R1 arrived at 512
    # step 3  [665, 1241)   R1 prefill 20 alone           256 + 320            -> R1 token 1 (R0 waits)
    # step 4  [1241, 1560)  R0 (KV 10) + R1 (KV 21)       256 + 32 + 31        -> both done
    # step 5  [1, 1 + 320)  R2 prefill 4
    rows = {r["request_id"]: r for r in rec.rows}
    expect_row(rows["R0"], 0, 384 * U, 1560 * U, 3)
    expect_row(rows["R1"], 512 * U, 1241 * U, 1560 * U, 2)
    expect_row(rows["R2"], 1, 1 + 320 * U, 1 + 320 * U, 1)
    shapes = [(c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) for c in e.cost.calls]
    assert shapes == [(0, 0, [(8, 8, True)]), (1, 9, []), (0, 0, [(20, 20, True)]), (2, 31, []),
                      (0, 0, [(4, 4, True)])]
    assert [t[0] for t in timeline(tl)] == [ms(x) for x in (384 * U, 665 * U, 1241 * U, 1560 * U, 1 + 320 * U)]
    assert rec.completed == 3 and rec.num_steps == 5


@pytest.mark.parametrize("fast_forward", [False, True])
def test_two_replicas_round_robin_exact_event_log(fast_forward):
    """R2 is routed to replica 0 in the middle of a decode stretch: with fast-forward the stretch is cut
    at the first step that ends after the arrival, exactly where stepping would plan next."""
    rec, _ = recorder()
    engines = [make_engine(num_blocks=64, max_num_batched_tokens=16, fast_forward=fast_forward, recorder=rec,
                           replica_id=i) for i in range(2)]
    trace = [
        make_request("R0", arrival=0.0, prompt=8, output=6),    # -> replica 0
        make_request("R1", arrival=0.0, prompt=4, output=2),    # -> replica 1
        make_request("R2", arrival=832 * U, prompt=4, output=2),  # -> replica 0, mid-stretch
    ]
    _, end = run_sim(engines, trace, router="round-robin")
    # replica 0: [0,384) R0 prefill 8; [384,665) KV 9; [665,947) KV 10 (R2 arrives at 832);
    #            [947,1294) R0 KV 11 + R2 prefill 4 (256+80+11); [1294,1599) KV 12 + 5 (256+32+17): R2 done;
    #            [1599,1884) R0 KV 13: done
    # replica 1: [0,320) R1 prefill 4; [320,597) KV 5: done
    rows = {r["request_id"]: r for r in rec.rows}
    expect_row(rows["R0"], 0, 384 * U, 1884 * U, 6)
    expect_row(rows["R1"], 0, 320 * U, 597 * U, 2)
    expect_row(rows["R2"], 832 * U, 1294 * U, 1599 * U, 2)
    assert {r["request_id"]: r["replica"] for r in rec.rows} == {"R0": 0, "R1": 1, "R2": 0}
    assert end == float(1884 * U)
    assert rec.num_steps == 8
    if fast_forward:
        assert engines[0].replica.num_ff_stretches >= 1
