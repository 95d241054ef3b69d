"""kvsim.cost.calibrate: the vectorised model equals RooflineCost, a fit recovers known parameters from
synthetic timings, and calibration.yaml holds a usable entry per hardware plus the leave-one-out fits."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import yaml

from kvsim.cost import calibrate as C
from kvsim.cost import roofline as R
from kvsim.cost.base import StepShape
from kvsim.cost.profile import write_profile
from kvsim.cost.roofline import RooflineCost, RooflineParams
from kvsim.methods import all_methods, parse_method
from kvsim.methods.none import NoCompression
from kvsim.specs import load_hardware, load_model

TRUE = dataclasses.replace(
    RooflineParams(), eff_flops=0.62, gemm_half_tokens=96.0, eff_mem=0.81, kernel_overhead_s=3e-6, eff_elem=1.3,
    elem_overhead_s=2e-6, eff_attn_flops=0.41, eff_attn_mem=0.88, attn_q_tile=64.0, attn_ctas=120.0,
    attn_seq_overhead_s=2e-7, attn_overhead_s=9e-6)


def synthetic_profile(path, params: RooflineParams, model="llama-3.1-8b", hardware="h100", tp=1):
    """A profile whose every time is the roofline's own prediction under ``params``."""
    m, hw = load_model(model), load_hardware(hardware)
    roof = RooflineCost(m, hw, NoCompression(), tp, params)
    toks = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096]
    tables = {}
    for op in ("qkv", "o", "mlp", "other"):
        tables[f"linear.{op}"] = {"axes": {"num_tokens": toks}, "time_s": [roof.linear_time_s(op, t) for t in toks]}
    tables["linear.lm_head"] = {"axes": {"num_tokens": toks[:6]}, "time_s": [roof.lm_head_time_s(t) for t in toks[:6]]}
    tables["step.final_norm"] = {"axes": {"num_tokens": toks}, "time_s": [roof.step_op_time_s("final_norm", t) for t in toks]}
    tables["step.sampler"] = {"axes": {"batch_size": toks[:6]}, "time_s": [roof.step_op_time_s("sampler", t) for t in toks[:6]]}
    bs, kvs = [1, 4, 16, 64, 256], [16, 256, 1024, 4096, 16384]
    L = m.num_layers
    tables["attention.decode.none"] = {"axes": {"batch_size": bs, "kv_tokens": kvs},
                                       "time_s": [[roof.decode_attention_time_s(b, b * k) / L for k in kvs] for b in bs]}
    qs = [16, 64, 256, 1024, 2048]
    tables["attention.prefill.flash"] = {"axes": {"chunk_tokens": qs, "kv_tokens": kvs},
                                         "time_s": [[roof.prefill_attention_time_s([(q, k, True)]) / L if k >= q else None
                                                     for k in kvs] for q in qs]}
    write_profile(path, {"name": f"synthetic-{hardware}", "model": model, "hardware": hardware,
                         "tensor_parallel_size": tp, "tables": tables})
    return path


def test_vectorised_model_equals_roofline_cost(tmp_path):
    p = synthetic_profile(tmp_path / "h100__llama-3.1-8b__tp1.json", TRUE)
    for t in C.load_tables([p]):
        assert np.allclose(C.predict(t, TRUE), t.measured, rtol=1e-5), t.op


def test_fit_recovers_known_parameters(tmp_path):
    paths = [synthetic_profile(tmp_path / "a.json", TRUE), synthetic_profile(tmp_path / "b.json", TRUE, model="qwen3-32b", tp=2)]
    tables = C.load_tables(paths)
    start = dataclasses.replace(RooflineParams(), eff_attn_mem=0.7, eff_elem=0.6, attn_q_tile=32.0, attn_ctas=60.0,
                                attn_seq_overhead_s=1e-7, attn_overhead_s=5e-6, elem_overhead_s=4e-6)
    got, free = C.fit(tables, start)
    assert "eff_comm" not in free  # no all-reduce table: not identifiable, left alone
    for name in ("eff_flops", "eff_mem", "eff_attn_mem", "eff_elem"):
        assert getattr(got, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    for t in tables:
        err = np.abs(C.predict(t, got) / t.measured - 1)
        assert np.median(err) < 0.02, t.op


def test_prefill_padding_and_wave_floor():
    f = C.prefill_flops_factor(np.array([16.0, 64.0, 4096.0]), 32.0, 64.0, 128.0)
    # q=16: padded to one 64-row tile per head (x4), and 32 heads x 1 tile < 128 tiles -> x4 more
    assert f[0] == pytest.approx(16.0) and f[1] == pytest.approx(4.0) and f[2] == pytest.approx(1.0)


def test_mixed_steps_cost_decodes_as_prefill_rows():
    m, hw = load_model("llama-3.1-8b"), load_hardware("rtx-pro-6000")
    roof = RooflineCost(m, hw, NoCompression(), 1, R.calibrated_params("rtx-pro-6000"))
    pure = roof.decode_attention_time_s(64, 64 * 1024)
    inside = roof.mixed_decode_attention_time_s(64, 64 * 1024)
    assert inside > 1.2 * pure  # no split-KV / GQA packing inside a prefill call
    mixed = roof.step_time_s(StepShape(64, 64 * 1024, [(512, 512, True)]))
    assert mixed == pytest.approx(roof.dense_time_s(576, 65) + inside + roof.prefill_attention_time_s([(512, 512, True)]))


@pytest.mark.parametrize("hw", ["rtx-pro-6000", "rtx-4090", "h100", "l40s"])
def test_decode_fast_path_equals_step_time(hw):
    m = load_model("qwen3-30b-a3b" if hw == "l40s" else "llama-3.1-8b")
    roof = RooflineCost(m, load_hardware(hw), NoCompression(), 1, R.calibrated_params(hw), expert_parallel_size=1)
    for b, kept in ((1, 17), (37, 37 * 900), (128, 128 * 3000)):
        slow = roof.dense_time_s(b, b) + roof.decode_attention_time_s(b, kept)
        assert roof.decode_step_time_s(b, kept) == pytest.approx(slow, rel=1e-12)
        assert roof.step_time_s(StepShape(b, kept)) == roof.decode_step_time_s(b, kept)


@pytest.mark.parametrize("method", all_methods())
def test_decode_step_fn_gives_decode_step_time_bit_for_bit(method):
    """A fast-forward stretch costs its steps with the batch size's own function; its values must be
    decode_step_time_s's exactly (for methods with and without their own decode work, with and without
    a skewed batch), and the pre-multiplied arithmetic must agree with the operation-by-operation sum."""
    params = dataclasses.replace(R.calibrated_params("h100"), attn_skew_decode=0.3)
    roof = RooflineCost(load_model("llama-3.1-8b"), load_hardware("h100"), parse_method(method), 1, params)
    for b in (1, 7, 64, 300):
        fn = roof.decode_step_fn(b)
        for kept in (b, b * 129 + 5, b * 4096, b * 100_003):
            for max_kept in (0, kept // b, kept // b + 1000):
                assert fn(kept, max_kept) == roof.decode_step_time_s(b, kept, max_kept)
                parts = roof._dense(b) + roof.decode_attention_time_s(b, kept) + roof.decode_skew_s(b, kept, max_kept)
                assert fn(kept, max_kept) == pytest.approx(parts, rel=1e-12)
            assert fn(kept) == roof.step_time_s(StepShape(b, kept))


def test_calibration_yaml_has_every_hardware_and_the_withheld_fits():
    table = yaml.safe_load(open(C.CALIBRATION_YAML))
    hws = table["hardware"]
    assert {"default", "a100", "h100", "a40", "rtx-4090", "rtx-pro-6000"} <= set(hws)
    for name, entry in hws.items():
        for k in C.NAMES + list(C.A_PRIORI):
            assert isinstance(entry[k], float) and math.isfinite(entry[k]), (name, k)
    assert R.calibrated_params("rtx-pro-6000").eff_flops == pytest.approx(hws["rtx-pro-6000"]["eff_flops"])
    assert "default" in R.calibrated_params("no-such-gpu").source
    pairs = {(h, m) for h, m in (k.split("/") for k in table["leave_one_out"])}
    assert ("rtx-4090", "llama-3.1-8b") in pairs and ("rtx-pro-6000", "qwen3-32b") in pairs
    assert R.withheld_params("rtx-pro-6000", "llama-3.1-8b").source.endswith("without llama-3.1-8b")
    assert R.withheld_params("rtx-pro-6000", "no-such-model") is None


def test_yaml_numbers_read_back_as_floats():
    for v in (1e-05, 2.5e-7, 0.2, 1234.5, 3e-4):
        assert yaml.safe_load(f"x: {C.yaml_number(v)}")["x"] == pytest.approx(v, rel=1e-3)


def test_calibrating_the_imported_profiles_beats_the_generic_defaults():
    tables = [t for t in C.load_tables() if t.hardware == "rtx-pro-6000" and t.model == "llama-3.1-8b" and t.tp == 1]
    if not tables:
        pytest.skip("no imported rtx-pro-6000 profile")
    got, _ = C.fit(tables, dataclasses.replace(RooflineParams(), **C.A_PRIORI))
    for t in tables:
        if t.op in C.NOT_FITTED:
            continue
        before = np.median(np.abs(C.predict(t, RooflineParams(), legacy=True) / t.measured - 1))
        after = np.median(np.abs(C.predict(t, got) / t.measured - 1))
        assert after <= before + 0.02, t.op


def test_a_machine_collective_figure_replaces_the_fitted_nvlink_efficiency():
    """RTX PRO 6000 (PCIe, its machine's figure C = 17.18 GB/s, c = 20 us per ring step): a 2-GPU ring
    all-reduce of S bytes is 2 steps of S/2, 2 (c + S / (2 C)), whatever eff_comm says; the EP token
    exchange over 2 ranks (vLLM's all-gather of T (h + E) b, hidden states and router logits, and
    reduce-scatter of T h b a rank) is 2 c + T (2h + E) b / C. Hardware without a figure keeps
    allreduce_latency_s + 2 (p-1)/p S / (X eff_comm)."""
    p = RooflineParams(eff_comm=0.5, allreduce_latency_s=1e-3)
    q32 = RooflineCost(load_model("qwen3-32b"), load_hardware("rtx-pro-6000"), NoCompression(), 2, p)
    S = 128 * 5120 * 2
    one = 2 * (20e-6 + S / 2 / 17.18e9)
    assert one == pytest.approx(116.29e-6, rel=1e-4)
    assert q32.collective_time_s(S, 2) == pytest.approx(one)
    assert q32.allreduce_time_s(128) == pytest.approx(2 * one)  # two per layer
    moe = RooflineCost(load_model("qwen3-30b-a3b"), load_hardware("rtx-pro-6000"), NoCompression(), 1, p,
                       expert_parallel_size=2)
    assert moe.alltoall_time_s(64) == pytest.approx(2 * 20e-6 + 64 * (2 * 2048 + 128) * 2 / 17.18e9)
    assert moe.allreduce_time_s(64) == 0.0  # TP 1
    a100 = RooflineCost(load_model("qwen3-32b"), load_hardware("a100"), NoCompression(), 2, p)
    assert a100.collective_time_s(S, 2) == pytest.approx(1e-3 + S / (300e9 * 0.5))
    assert a100.collective_time_s(S, 4) == pytest.approx(1e-3 + 1.5 * S / (300e9 * 0.5))


def test_expert_parallel_moe_follows_the_groups_gathered_tokens():
    """vLLM 0.19's allgather_reducescatter backend: a rank's experts run over the N tokens gathered from
    its group, the exchange is sized by the largest share S. A rank's own step assumes every rank carries
    its T (N = ep T). Roofline: the pairs of N / ep tokens over the local experts N tokens touch; the
    profile: linear.moe_by_experts at (N / ep, (E / ep)(1 - (1 - k/E)^N)), here by hand."""
    from kvsim.cost.profile import load_profile
    from kvsim.cost.profiled import ProfiledCost
    from pathlib import Path

    m, hw = load_model("qwen3-30b-a3b"), load_hardware("rtx-pro-6000")
    roof = RooflineCost(m, hw, NoCompression(), 1, R.calibrated_params(hw.name), expert_parallel_size=2)
    prof = ProfiledCost(load_profile(Path(__file__).parent.parent / "kvsim/profiles/imported/rtx-pro-6000__qwen3-30b-a3b__tp1.json"), roof)
    L = m.num_layers
    for c in (roof, prof):
        for T in (1, 30, 256, 2048):
            assert c.moe_time_s(T) == pytest.approx(c.moe_group_time_s(2 * T, T))
        assert c.moe_group_time_s(0, 0) == 0.0
        # an eager step: 2048 prefill tokens on one rank, 56 on the other: less expert work than 2 x 2048
        assert c.moe_group_time_s(2104, 2048) < c.moe_time_s(2048)
        assert c.moe_group_time_s(2104, 2048) - c.moe_group_time_s(2104, 56) == pytest.approx(
            L * (roof.alltoall_time_s(2048) - roof.alltoall_time_s(56)))
    # roofline compute: one layer's work at N = 2104 is that of 1052 tokens a rank, local experts of 2104
    w = roof.moe_work(2104)
    assert w.flops == pytest.approx(6 * 1052 * 8 * 2048 * 768 + 2 * 1052 * 2048 * 128)
    local = 64 * (1 - (1 - 8 / 128) ** 2104)
    assert w.bytes == pytest.approx(2 * (local * 3 * 2048 * 768 + 2048 * 128 + 2 * 1052 * 2048 + 3 * 1052 * 8 * 768))
    # profile: tokens 1052 between the grid's 1024 and 2048, experts 64 (all local ones touched): log-log
    tab = prof.profile.tables["linear.moe_by_experts"]
    lo, hi = tab.lookup_at(1024, 64), tab.lookup_at(2048, 64)
    want = math.exp(math.log(lo) + math.log(1052 / 1024) / math.log(2) * (math.log(hi) - math.log(lo)))
    assert prof.moe_group_time_s(2104, 2048) == pytest.approx(L * (want + roof.alltoall_time_s(2048)))


# -- issue 16, point 4: where calibrate writes, and a rerun reproduces the committed fit -------------------
def _committed():
    return yaml.safe_load(open(C.CALIBRATION_YAML))


def _same(entry: dict, p: RooflineParams, names) -> None:
    for n in names:
        assert entry[n] == pytest.approx(float(f"{getattr(p, n):.4g}"), rel=2e-3, abs=1e-12), n


def test_calibrate_writes_into_out_not_into_the_package(tmp_path):
    from kvsim.cli import main

    before = C.CALIBRATION_YAML.read_bytes()
    prof = C.PROFILES_DIR / "a40__llama-2-7b__tp1.json"
    assert main(["calibrate", "--out", str(tmp_path / "cal"), "--no-loo", "--profiles", str(prof)]) == 0
    assert (tmp_path / "cal" / "calibration.yaml").is_file()
    assert C.CALIBRATION_YAML.read_bytes() == before
    written = yaml.safe_load(open(tmp_path / "cal" / "calibration.yaml"))
    assert "a40" in written["hardware"]


def test_the_fit_is_identified_whatever_the_start():
    """A40's prefill data hold the query tile and the wave floor only as their product (every chunk is
    longer than a tile); the weak prior pins the split, so two different starts give the same fit."""
    tables = [t for t in C.load_tables() if t.hardware == "a40"]
    base = dataclasses.replace(RooflineParams(), **C.A_PRIORI)
    a, free = C.fit(tables, base)
    b, _ = C.fit(tables, dataclasses.replace(base, attn_q_tile=120.0, attn_ctas=20.0, eff_mem=0.5, gemm_half_tokens=400.0))
    for n in free:
        assert getattr(a, n) == pytest.approx(getattr(b, n), rel=5e-3), n


def test_a_rerun_reproduces_the_committed_calibration():
    """The per-hardware fits (``kvsim calibrate --no-loo``; the leave-one-out fits are the same fit on
    fewer tables) equal the committed calibration.yaml to the 4 digits it stores."""
    tables = C.load_tables()
    default, per_hw = C.fit_all(tables)
    default, per_hw, _ = C.apply_skew(default, per_hw, {}, C.load_skew())
    per_hw, _ = C.apply_hopper(per_hw, {}, C.hopper_decode_efficiency())
    committed = _committed()["hardware"]
    names = C.NAMES + list(C.SKEW.values()) + list(C.A_PRIORI)
    _same(committed["default"], default, names)
    for hw, (p, _) in per_hw.items():
        _same(committed[hw], p, names)


def test_a_rerun_reproduces_a_committed_leave_one_out_fit():
    tables = C.load_tables()
    pair = ("a40", "llama-2-7b")  # a40's only model: the default fitted without a40
    default, _ = C.fit_all([t for t in tables if t.pair != pair])
    entry = _committed()["leave_one_out"]["a40/llama-2-7b"]
    _same(entry, default, [n for n in C.NAMES if n not in C.SKEW.values()])
