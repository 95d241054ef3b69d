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
    decode_step_time_s's exactly (for methods with and without their own decode work)."""
    roof = RooflineCost(load_model("llama-3.1-8b"), load_hardware("h100"), parse_method(method), 1,
                        R.calibrated_params("h100"))
    for b in (1, 7, 64, 300):
        fn = roof.decode_step_fn(b)
        for kept in (b, b * 129 + 5, b * 4096, b * 100_003):
            assert fn(kept) == roof.decode_step_time_s(b, kept)


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
        assert yaml.safe_load(f"x: {C._yaml_num(v)}")["x"] == pytest.approx(v, rel=1e-3)


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
