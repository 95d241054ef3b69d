"""Decode batches of unequal context (``StepShape.decode_max_kept``, ``attn_skew_*``, profile
``decode_skew_alpha``): LLMServingSim measures such a batch between the uniform batch at the mean and at
the largest context, ``t = t(mean) + alpha (t(max) - t(mean))``; kvsim costs it the same way."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from kvsim import api
from kvsim.cost.base import StepShape
from kvsim.cost.calibrate import apply_skew
from kvsim.cost.profile import load_profile
from kvsim.cost.profiled import ProfiledCost
from kvsim.cost.roofline import RooflineCost, RooflineParams, calibrated_params
from kvsim.errors import ConfigError
from kvsim.specs.hardware import load_hardware
from kvsim.specs.model import load_model
from profiler.importers.llmservingsim import skew_alphas

from conftest import TINY, examples, small_config
from test_fast_forward import assert_same, requests, scenario_spec, scenarios


def roof(alpha_decode=0.0, alpha_mixed=0.0):
    p = replace(calibrated_params("h100"), attn_skew_decode=alpha_decode, attn_skew_mixed=alpha_mixed)
    return RooflineCost(load_model("llama-3.1-8b"), load_hardware("h100"), None, 1, p)


def test_roofline_decode_skew_is_alpha_of_the_gap_to_the_uniform_max_batch():
    base, skew = roof(), roof(0.25)
    B, S, M = 32, 32 * 1000, 4000
    gap = base.decode_kernel_s(B, B * M) - base.decode_kernel_s(B, S)
    assert gap > 0
    assert skew.decode_step_time_s(B, S, M) == pytest.approx(base.decode_step_time_s(B, S) + 0.25 * gap, rel=1e-12)
    # the fast path and the general step agree, and a uniform (or unknown) batch is not corrected
    assert skew.step_time_s(StepShape(B, S, [], M)) == skew.decode_step_time_s(B, S, M)
    assert skew.decode_step_time_s(B, S, S // B) == base.decode_step_time_s(B, S)
    assert skew.decode_step_time_s(B, S) == base.decode_step_time_s(B, S)


def test_roofline_mixed_skew_applies_to_the_decode_rows_of_a_prefill_call():
    base, skew = roof(), roof(0.0, 0.5)
    chunks = [(512, 512, True)]
    B, S, M = 8, 8 * 600, 3000
    extra = skew.step_time_s(StepShape(B, S, chunks, M)) - base.step_time_s(StepShape(B, S, chunks, M))
    assert extra == pytest.approx(skew.mixed_skew_s(B, S, M), rel=1e-12)
    assert extra > 0
    # the decode-call alpha does not leak into mixed steps, nor the mixed one into pure decodes
    assert roof(0.5).step_time_s(StepShape(B, S, chunks, M)) == base.step_time_s(StepShape(B, S, chunks, M))
    assert skew.decode_step_time_s(B, S, M) == base.decode_step_time_s(B, S)


def test_profile_alpha_wins_over_the_roofline_and_uses_measured_times(tmp_path):
    src = json.loads((_profiles() / "imported" / "rtx-pro-6000__llama-3.1-8b__tp1.json").read_text())
    src["decode_skew_alpha"] = {"decode": 0.1}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(src))
    prof = load_profile(path)
    model, hw = load_model("llama-3.1-8b"), load_hardware("rtx-pro-6000")
    fb = RooflineCost(model, hw, None, 1, replace(RooflineParams(), attn_skew_decode=0.9, attn_skew_mixed=0.3))
    cost = ProfiledCost(prof, fb)
    assert (cost._skew_decode, cost._skew_mixed) == (0.1, 0.3)  # mixed: the roofline's, the profile has none
    B, S, M = 64, 64 * 900, 3000
    measured_gap = cost._decode_table_s(B, B * M) - cost._decode_table_s(B, S)
    assert cost.decode_step_time_s(B, S, M) == pytest.approx(cost.decode_step_time_s(B, S) + 0.1 * measured_gap)
    assert cost.step_time_s(StepShape(B, S, [], M)) == cost.decode_step_time_s(B, S, M)


def test_one_chunk_with_decodes_is_costed_from_the_measured_mixed_table():
    prof = load_profile(_profiles() / "imported" / "rtx-4090__llama-3.1-8b__tp1.json")
    model, hw = load_model("llama-3.1-8b"), load_hardware("rtx-4090")
    fb = RooflineCost(model, hw, None, 1, calibrated_params("rtx-4090"))
    cost = ProfiledCost(prof, fb)
    mixed = prof.tables["attention.mixed.flash"]
    # a grid point: chunk 512 on 1024 cached tokens, 32 decodes attending 1025 tokens each
    shape = StepShape(32, 32 * 1025, [(512, 512 + 1024, False)], 0)
    want = cost.dense_time_s(shape.num_tokens, shape.num_logit_tokens) + model.num_layers * mixed.lookup(
        chunk_tokens=512, history_tokens=1024, batch_size=32, kv_tokens=1025)
    assert cost.step_time_s(shape) == pytest.approx(want, rel=1e-12)
    # a first chunk (no history) is on the grid too
    first = StepShape(4, 4 * 17, [(64, 64, True)], 0)
    assert cost.step_time_s(first) == pytest.approx(
        cost.dense_time_s(68, 5) + model.num_layers * mixed.lookup_at(64, 0, 4, 17), rel=1e-12)
    # two chunks, or decodes beyond the grid, fall back to prefill table + fitted decode rows
    two = StepShape(32, 32 * 1025, [(256, 256, True), (256, 1280, False)], 0)
    assert cost.step_time_s(two) == pytest.approx(
        cost.dense_time_s(544, 33) + fb.mixed_decode_attention_time_s(32, 32 * 1025)
        + cost.prefill_attention_time_s(two.prefill_chunks), rel=1e-12)
    wide = StepShape(200, 200 * 1025, [(512, 1536, False)], 0)
    assert cost.step_time_s(wide) == pytest.approx(
        cost.dense_time_s(712, 200) + fb.mixed_decode_attention_time_s(200, 200 * 1025)
        + cost.prefill_attention_time_s(wide.prefill_chunks), rel=1e-12)
    # the table times an uncompressed bf16 cache: a compression method does not use it
    from kvsim.methods import make_method

    kivi = ProfiledCost(prof, RooflineCost(model, hw, make_method("kivi"), 1, calibrated_params("rtx-4090")))
    assert kivi._mixed is None


def _profiles():
    from kvsim.cost.profiled import PROFILES_ROOT

    return PROFILES_ROOT


def test_profile_rejects_bad_skew_entries(tmp_path):
    src = json.loads(sorted(_profiles().glob("imported/rtx-4090__*.json"))[0].read_text())
    for bad, needle in (({"prefill": 0.1}, "unknown key 'prefill'"), ({"decode": "x"}, "decode_skew_alpha['decode']"),
                        ([0.1], "must be a mapping")):
        src["decode_skew_alpha"] = bad
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(src))
        with pytest.raises(ConfigError, match="bad.json") as e:
            load_profile(path)
        assert needle in str(e.value)


def test_importer_alpha_is_the_least_squares_fit_per_regime(tmp_path):
    # pure: gaps (t_max - t_mean) 10 and 20 with excess (t_skew - t_mean) 1 and 4 -> (10 + 80) / (100 + 400)
    # mixed: one gap 4, excess 2 -> 0.5; a row with t_max <= t_mean carries no information
    path = tmp_path / "skew.csv"
    path.write_text("regime,n,t_mean_us,t_max_us,t_skew_us\n"
                    "pure,2,100,110,101\npure,4,50,70,54\nmixed,2,10,14,12\nmixed,2,10,9,30\n")
    alpha, counts = skew_alphas(path)
    assert alpha == {"decode": round(90 / 500, 4), "mixed": 0.5}
    assert counts == {"pure": 2, "mixed": 2}


def test_imported_profiles_carry_their_skew():
    prof = load_profile(_profiles() / "imported" / "rtx-pro-6000__llama-3.1-8b__tp1.json")
    assert set(prof.decode_skew_alpha) == {"decode", "mixed"}
    assert 0 < prof.decode_skew_alpha["decode"] < prof.decode_skew_alpha["mixed"] < 1


def test_calibration_skew_is_per_hardware_and_leave_one_out_drops_the_pair():
    skew = {("x", "m1", 1): {"decode": 0.1, "mixed": 0.3}, ("x", "m2", 1): {"decode": 0.3, "mixed": 0.5},
            ("y", "m1", 1): {"decode": 0.5, "mixed": 0.7}}
    p = RooflineParams()
    default, per_hw, loo = apply_skew(p, {"x": (p, []), "z": (p, [])}, {("x", "m1"): (p, ""), ("y", "m1"): (p, "")}, skew)
    assert default.attn_skew_decode == pytest.approx(0.3)
    assert per_hw["x"][0].attn_skew_decode == pytest.approx(0.2) and per_hw["x"][1] == ["attn_skew_decode", "attn_skew_mixed"]
    assert per_hw["z"][0].attn_skew_mixed == pytest.approx(0.5) and per_hw["z"][1] == []  # no own data: the default
    assert loo[("x", "m1")][0].attn_skew_decode == pytest.approx(0.3)  # x's other model only
    assert loo[("y", "m1")][0].attn_skew_decode == pytest.approx(0.2)  # y unseen: the others


def test_replica_reports_the_largest_kept_count():
    from conftest import make_engine, make_request, run_sim

    eng = make_engine(max_num_batched_tokens=64)
    run_sim([eng], [make_request("a", 0.0, 40, 3), make_request("b", 0.0, 8, 3)])
    decodes = [s for s in eng.cost.calls if s.num_decode_seqs == 2 and not s.prefill_chunks]
    # both prompts prefill in the first step; then two decode steps over 41 + 9 and 42 + 10 tokens
    assert [(s.decode_kept_tokens, s.decode_max_kept) for s in decodes] == [(50, 41), (52, 42)]


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_fast_forward_equals_stepping_with_skew(sc):
    reqs, cfg, method = sc
    out = []
    for ff in (True, False):
        spec = scenario_spec(TINY, method, cfg)
        spec.roofline_params = replace(calibrated_params("h100"), attn_skew_decode=0.7, attn_skew_mixed=0.4)
        out.append(api.replay(requests(reqs), spec=spec, fast_forward=ff, check_invariants=True, keep_rows=True))
    assert_same(*out)
