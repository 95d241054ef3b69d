"""kvsim validate: a hand-made case whose answer is computed by hand, config errors that name the file,
key and value, and the five published vLLM runs (skipped when ../shared is absent)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from kvsim import validate as V
from kvsim.cli import main
from kvsim.cost.profile import write_profile
from kvsim.errors import ConfigError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CASES = SHARED / "validation"
REAL = sorted(CASES.glob("lss_*")) if CASES.is_dir() else []

# -- the hand-made case ---------------------------------------------------------------------------
# smollm2-135m (30 layers) with a profile of constant tables, so every step time is a sum of constants:
L = 30
LAYER = 1e-5 + 1e-5 + 2e-5 + 1e-5          # qkv + o + mlp + other
STEP = 1e-4 + 1e-5 + 1e-5 + 1e-5 + 1e-3    # lm_head + embedding + final norm + sampler + step_overhead_s
PREFILL_STEP = L * (LAYER + 3e-5) + STEP   # prefill attention 3e-5 per layer: 3.53 ms
DECODE_STEP = L * (LAYER + 1e-5) + STEP    # decode attention 1e-5 per layer: 2.93 ms
# two requests that never overlap: prompt, output tokens, realised arrival
REQS = [("r0", 32, 4, 0.0), ("r1", 64, 3, 1.0)]


def _const1(axis, value, hi=8192):
    return {"axes": {axis: [1, hi]}, "time_s": [value, value]}


def _const2(a, b, value):
    return {"axes": {a: [1, 8192], b: [1, 100000]}, "time_s": [[value, value], [value, value]]}


def make_case(tmp_path: Path, run_extra: str = "", measured_ttft_scale: float = 2.0) -> Path:
    case = tmp_path / "tiny_case"
    case.mkdir()
    prof = tmp_path / "const-profile.json"
    write_profile(prof, {
        "name": "const", "model": "smollm2-135m", "hardware": "h100", "tensor_parallel_size": 1,
        "dtype": "bfloat16", "step_overhead_s": 1e-3,
        "tables": {
            "linear.qkv": _const1("num_tokens", 1e-5), "linear.o": _const1("num_tokens", 1e-5),
            "linear.mlp": _const1("num_tokens", 2e-5), "linear.other": _const1("num_tokens", 1e-5),
            "linear.lm_head": _const1("num_tokens", 1e-4), "step.embedding": _const1("num_tokens", 1e-5),
            "step.final_norm": _const1("num_tokens", 1e-5), "step.sampler": _const1("batch_size", 1e-5),
            "attention.prefill.flash": _const2("chunk_tokens", "kv_tokens", 3e-5),
            "attention.decode.none": _const2("batch_size", "kv_tokens", 1e-5),
        },
    })
    with open(tmp_path / "workload.jsonl", "w") as f:
        for rid, p, o, t in REQS:  # intended arrivals differ from the realised ones in measured.csv
            f.write(json.dumps({"request_id": rid, "arrival_time_s": t + 0.05, "prompt_tokens": p, "output_tokens": o}) + "\n")
    (case / "run.yaml").write_text(
        "case_id: tiny\nmodel: HuggingFaceTB/SmolLM2-135M\ntensor_parallel_size: 1\nmax_num_seqs: 8\n"
        "max_num_batched_tokens: 512\nenable_prefix_caching: true\nenforce_eager: false\n"
        "gpu:\n  sku: NVIDIA H100 80GB HBM3\nworkload: ../workload.jsonl\n" + run_extra)
    with open(case / "measured.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "arrival_time_s", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms", "queue_ms"])
        for i, (rid, p, o, t) in enumerate(REQS):
            ttft = PREFILL_STEP * 1e3 * (measured_ttft_scale if i == 0 else 1.0)
            w.writerow([rid, t, p, o, ttft, DECODE_STEP * 1e3, (PREFILL_STEP + (o - 1) * DECODE_STEP) * 1e3, 0.0])
    return case


def test_hand_made_case_matches_the_hand_computed_answer(tmp_path):
    case_dir = make_case(tmp_path)
    res = V.validate([case_dir], tmp_path / "out", profile=tmp_path / "const-profile.json")[0]
    by = {(e["metric"], e["stat"]): e for e in res.errors}
    # every request: TTFT = one prefill step, TPOT = one decode step, e2el = prefill + (n-1) decodes
    for rid, p, o, t in REQS:
        j = next(x for x in res.joined if x["request_id"] == rid)
        assert j["predicted_ttft_ms"] == pytest.approx(PREFILL_STEP * 1e3, rel=1e-9)
        assert j["predicted_tpot_ms"] == pytest.approx(DECODE_STEP * 1e3, rel=1e-9)
        assert j["predicted_e2el_ms"] == pytest.approx((PREFILL_STEP + (o - 1) * DECODE_STEP) * 1e3, rel=1e-9)
    # measured TTFT of r0 is twice the prediction: mean measured = 1.5 x predicted -> error -1/3
    assert by[("ttft_ms", "mean")]["predicted"] == pytest.approx(PREFILL_STEP * 1e3)
    assert by[("ttft_ms", "mean")]["error_pct"] == pytest.approx(-100.0 / 3.0)
    # numpy linear-interpolation percentiles of two values: p90 = a + 0.9 (b - a)
    a, b = PREFILL_STEP * 1e3, 2 * PREFILL_STEP * 1e3
    assert by[("ttft_ms", "p90")]["measured"] == pytest.approx(a + 0.9 * (b - a))
    assert by[("tpot_ms", "p50")]["error_pct"] == pytest.approx(0.0, abs=1e-9)
    assert by[("e2el_ms", "p99")]["error_pct"] == pytest.approx(0.0, abs=1e-9)
    # throughput: 2 requests over (last finish - first arrival), realised arrivals (r1 at 1.0 s)
    span = 1.0 + PREFILL_STEP + 2 * DECODE_STEP
    thr = by[("request_throughput", "value")]
    assert thr["predicted"] == pytest.approx(2 / span) and thr["measured"] == pytest.approx(2 / span)
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "errors.csv")))
    assert list(rows[0]) == ["case", "metric", "stat", "predicted", "measured", "error_pct"]
    assert len(rows) == 3 * 4 + 1 and {r["case"] for r in rows} == {"tiny"}
    assert (out / "errors.md").is_file() and (out / "tiny" / "latency.png").is_file()
    steps = list(csv.DictReader(open(out / "tiny" / "steps.csv")))
    assert len(steps) == 2 + (4 - 1) + (3 - 1)  # one prefill and n-1 decodes per request
    assert float(steps[0]["duration_ms"]) == pytest.approx(PREFILL_STEP * 1e3, rel=1e-6)


def test_measured_steps_are_costed_by_shape(tmp_path):
    case_dir = make_case(tmp_path, measured_ttft_scale=1.0)
    with open(case_dir / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(V.STEP_COLUMNS)
        w.writerow([0, 0, 0.0, 0.0, PREFILL_STEP * 1e3 * 1.25, 32, 1, 0, 0, "32:32:1", 0])  # kvsim 20 % short
        w.writerow([1, 0, 0.0, 0.0, DECODE_STEP * 1e3, 0, 0, 1, 33, "", 0])
    res = V.validate([case_dir], None, profile=tmp_path / "const-profile.json")[0]
    assert res.step_summary["prefill"]["total_time_error_pct"] == pytest.approx(-20.0)
    assert res.step_summary["decode"]["median_abs_error_pct"] == pytest.approx(0.0, abs=1e-9)


def test_arrivals_from_the_workload_when_asked(tmp_path):
    case_dir = make_case(tmp_path)
    case = V.load_case(case_dir)
    assert [r.arrival_time_s for r in V.case_requests(case, "measured")] == [0.0, 1.0]
    assert [r.arrival_time_s for r in V.case_requests(case, "workload")] == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("extra, key, value", [
    ("max_num_seq: 64\n", "max_num_seq", "64"),
    ("enable_chunked_prefil: true\n", "enable_chunked_prefil", "True"),
])
def test_unknown_engine_option_names_file_key_and_value(tmp_path, extra, key, value):
    case_dir = make_case(tmp_path, run_extra=extra)
    with pytest.raises(ConfigError) as e:
        V.load_case(case_dir)
    msg = str(e.value)
    assert str(case_dir / "run.yaml") in msg and key in msg and value in msg


@pytest.mark.parametrize("extra, key, value", [
    ("max_model_len: lots\n", "max_model_len", "lots"),
    ("gpu_memory_utilization: 1.5\n", "gpu_memory_utilization", "1.5"),
    ("kv_cache_dtype: int3\n", "kv_cache_dtype", "int3"),
    ("num_gpu_blocks: -4\n", "num_gpu_blocks", "-4"),
])
def test_bad_value_names_file_key_and_value(tmp_path, extra, key, value):
    case_dir = make_case(tmp_path)
    text = (case_dir / "run.yaml").read_text().replace("max_num_seqs: 8\n", "max_num_seqs: 8\n" + extra)
    (case_dir / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        V.load_case(case_dir)
    msg = str(e.value)
    assert str(case_dir / "run.yaml") in msg and key in msg and value in msg


def test_unknown_model_or_gpu_is_a_clear_error(tmp_path):
    case_dir = make_case(tmp_path)
    run = case_dir / "run.yaml"
    run.write_text(run.read_text().replace("HuggingFaceTB/SmolLM2-135M", "acme/NoSuchModel-1B"))
    with pytest.raises(ConfigError, match="acme/NoSuchModel-1B"):
        V.load_case(case_dir)
    run.write_text(run.read_text().replace("acme/NoSuchModel-1B", "HuggingFaceTB/SmolLM2-135M").replace("H100 80GB HBM3", "Voodoo 5"))
    with pytest.raises(ConfigError, match="Voodoo 5"):
        V.load_case(case_dir)


def test_cli_validate_writes_outputs_and_reports_errors(tmp_path, capsys):
    case_dir = make_case(tmp_path)
    out = tmp_path / "cli_out"
    assert main(["validate", str(case_dir), "--out", str(out), "--profile", str(tmp_path / "const-profile.json")]) == 0
    assert "ttft_ms" in capsys.readouterr().out
    assert (out / "errors.csv").is_file() and (out / "tiny" / "requests_joined.csv").is_file()
    bad = tmp_path / "nowhere"
    bad.mkdir()
    assert main(["validate", str(bad)]) == 2
    assert "no run.yaml" in capsys.readouterr().err


def test_anchor_parsing(tmp_path):
    p = tmp_path / "anchor.txt"
    p.write_text("header line\nMetric   vLLM   Sim   Diff%\n----\nTTFT Mean   100.0   90.0   -10.0%\n"
                 "TPOT Median   20.0   21.0   +5.0%\nLatency P99   1000.0  1010.0  +1.0%\n")
    a = V.read_anchor(p)["metrics"]
    assert a["ttft_ms"]["mean"] == {"measured": 100.0, "sim": 90.0, "diff_pct": -10.0}
    assert a["tpot_ms"]["p50"]["diff_pct"] == 5.0 and a["e2el_ms"]["p99"]["sim"] == 1010.0


# -- the published runs -------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL, reason="../shared/validation not present")
@pytest.mark.parametrize("case_dir", REAL, ids=[p.name for p in REAL])
def test_real_cases_load_and_replay(case_dir):
    case = V.load_case(case_dir)
    assert case.model in ("llama-3.1-8b", "qwen3-32b", "qwen3-30b-a3b")
    assert case.hardware in ("rtx-4090", "rtx-pro-6000")
    assert case.anchor is not None and len(case.measured) == 300
    res = V.validate_case(case, None)
    assert len(res.joined) == 300 and all(j["predicted_e2el_ms"] is not None for j in res.joined)
    e = {(x["metric"], x["stat"]): x["error_pct"] for x in res.errors}
    # a loose guard against regressions (the targets themselves are in docs/fidelity.md)
    assert abs(e[("tpot_ms", "mean")]) < 25 and not math.isnan(e[("e2el_ms", "p50")])


@pytest.mark.skipif(not (CASES / "lss_rtx4090_llama31-8b_tp1_mns256").is_dir(), reason="../shared/validation not present")
def test_recorded_gpu_blocks_pin_the_kv_capacity():
    case = V.load_case(CASES / "lss_rtx4090_llama31-8b_tp1_mns256")
    assert case.config.num_gpu_blocks_override == 2588
    spec = V.resolve_spec(case)
    assert spec.profile is not None and spec.profile.hardware == "rtx-4090"
    roof = V.resolve_spec(case, use_profile=False)
    assert roof.profile is None and "without" in roof.roofline_params.source
