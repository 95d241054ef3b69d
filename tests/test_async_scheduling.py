"""vLLM's asynchronous scheduling (``async_scheduling``, its default since 0.14): step n+1 is scheduled
when step n is launched, so a request arriving while step n runs is first scheduled in step n+2.
Hand-computed timelines with FakeCost (exact in float)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kvsim.config import EngineConfig
from kvsim.validate import vllm_async_by_default

from conftest import FakeCost, make_engine, make_request, run_sim


def _first_tokens(async_scheduling: bool, reqs, fast_forward: bool = False):
    e = make_engine(fast_forward=fast_forward)
    e.replica.async_scheduling = async_scheduling
    run_sim([e], reqs)
    rows = {r["request_id"]: r for r in e.rec.rows}
    assert all(r["status"] == "completed" for r in rows.values())
    return rows, e


def test_arrival_during_a_step_waits_one_more_step():
    # a: 16-token prompt, 4 outputs; step 1 = its prefill, [0, 1/32); step 2 = its first decode
    step1 = FakeCost.exact(16)
    step2 = FakeCost.exact(1, 17)
    assert step1 == Fraction(1, 32)
    t_b = 0.04  # during step 2, [1/32, 1/32 + step2)
    assert step1 < t_b < step1 + step2
    reqs = [make_request("a", 0.0, 16, 4), make_request("b", t_b, 16, 2)]
    sync, _ = _first_tokens(False, reqs)
    asyn, _ = _first_tokens(True, reqs)
    # synchronous: b's prefill runs in step 3, with a's second decode
    step3 = FakeCost.exact(1 + 16, 18)
    assert sync["b"]["ttft_ms"] == pytest.approx(float((step1 + step2 + step3 - Fraction(t_b)) * 1000), abs=1e-9)
    # asynchronous: step 3 was scheduled when step 2 started (before b arrived): a decodes alone, b joins step 4
    step3_alone = FakeCost.exact(1, 18)
    step4 = FakeCost.exact(1 + 16, 19)
    assert asyn["b"]["ttft_ms"] == pytest.approx(float((step1 + step2 + step3_alone + step4 - Fraction(t_b)) * 1000),
                                                 abs=1e-9)
    # a's own timeline is the same up to step 3
    assert asyn["a"]["ttft_ms"] == sync["a"]["ttft_ms"]


def test_idle_engine_starts_at_once():
    reqs = [make_request("a", 0.0, 16, 2), make_request("b", 5.0, 16, 2)]
    sync, _ = _first_tokens(False, reqs)
    asyn, _ = _first_tokens(True, reqs)
    assert asyn == sync
    assert asyn["b"]["ttft_ms"] == pytest.approx(float(FakeCost.exact(16)) * 1000)


def test_nothing_else_to_run_schedules_the_arrival_after_the_step():
    # a finishes in step 2 (prefill, one decode); b arrives during step 2. Step 3 would have been empty
    # when step 2 was launched, so vLLM schedules b as soon as step 2 ends, as the synchronous engine does
    step1, step2 = FakeCost.exact(16), FakeCost.exact(1, 17)
    t_b = float(step1) + 0.001
    reqs = [make_request("a", 0.0, 16, 2), make_request("b", t_b, 16, 2)]
    sync, _ = _first_tokens(False, reqs)
    asyn, e = _first_tokens(True, reqs)
    assert asyn == sync
    assert asyn["b"]["ttft_ms"] == pytest.approx(float((step1 + step2 + FakeCost.exact(16) - Fraction(t_b)) * 1000))
    assert not e.replica.incoming


def test_fast_forward_stretch_is_cut_and_the_arrival_joins_a_step_later():
    # a decodes in a stretch; b's arrival cuts it at the step it lands in, then one more step runs
    # before b's prefill: stepping and fast-forward agree
    reqs = [make_request("a", 0.0, 16, 40), make_request("b", 0.2, 16, 3)]
    stepped, _ = _first_tokens(True, reqs, fast_forward=False)
    ff, e = _first_tokens(True, reqs, fast_forward=True)
    assert ff == stepped
    assert e.replica.num_ff_stretches >= 1
    sync, _ = _first_tokens(False, reqs)
    assert stepped["b"]["ttft_ms"] > sync["b"]["ttft_ms"]


@pytest.mark.parametrize("extra, want", [
    ({"engine": "vllm", "engine_version": "0.15.1"}, True),
    ({"engine": "vllm", "engine_version": "0.19.0"}, True),
    ({"engine": "vllm", "engine_version": "0.13.2"}, False),
    ({"engine": "vllm"}, False),
    ({"engine": "kvprof-replay", "engine_version": "1.0"}, False),
])
def test_vllm_default_by_version(extra, want):
    assert vllm_async_by_default(extra, "run.yaml") is want


def test_config_accepts_the_vllm_option():
    assert EngineConfig().async_scheduling is False
    assert EngineConfig(async_scheduling=True).validate().async_scheduling is True
