"""Method costs as implementations (issue 14): measured terms, the engine baseline, composed methods,
the fit that produces them, and ``kvsim bench`` sweeps."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from kvsim.cli import main
from kvsim.cost import method_fit as mf
from kvsim.cost.base import StepShape
from kvsim.cost.engines import engine_params
from kvsim.cost.roofline import RooflineCost
from kvsim.work import Work
from kvsim.errors import ConfigError
from kvsim.methods import all_methods, parse_method
from kvsim.methods.base import Method
from kvsim.methods.impl import fitted_terms, load_terms_file, trial_terms
from kvsim.specs import load_hardware, load_model

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "reference" / "seed-lmdeploy" / "throughput.csv"
needs_seed = pytest.mark.skipif(not SEED.is_file(), reason="../shared/reference/seed-lmdeploy not present")
L7 = load_model("llama-2-7b")
A6000, H100 = load_hardware("rtx-a6000"), load_hardware("h100")


# -- implementations -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_implementation_names_engine_basis_and_source(name):
    cls = all_methods()[name]
    m = cls()
    impl = m.implementation()
    assert impl.engine and impl.source and impl.basis in ("measured", "composed", "first principles",
                                                         "first principles / composed", "published")
    for key, im in cls.IMPLEMENTATIONS.items():
        assert im.name == key
        if im.basis == "measured":
            assert im.terms_key and im.terms(), key
        if im.basis == "composed":
            assert im.borrows and im.terms(), key
    if cls.IMPLEMENTATIONS:  # the default is the first: the one backed by measurements where one exists
        first = next(iter(cls.IMPLEMENTATIONS.values()))
        assert m.impl == first.name
        if any(i.basis == "measured" for i in cls.IMPLEMENTATIONS.values()):
            assert first.basis == "measured"


def test_committed_terms_file_is_versioned_and_complete():
    doc = load_terms_file()
    assert doc["schema"] == "kvsim-method-terms" and doc["schema_version"] == 1
    for key in ("kivi/lmdeploy", "gear/lmdeploy", "h2o/lmdeploy", "streamingllm/lmdeploy"):
        terms = fitted_terms(key)
        assert terms and all(v >= 0 and math.isfinite(v) for v in terms.values())
        assert doc["implementations"][key]["fitted_on"]
    assert set(doc["engines"]["lmdeploy-0.6"]["fitted"]) <= set(doc["engines"]["lmdeploy-0.6"]["params"])


def test_trial_terms_override_and_restore():
    before = fitted_terms("kivi/lmdeploy")
    with trial_terms({"kivi/lmdeploy": {"dequant_ops_per_elem": 1.0}}):
        assert parse_method("kivi").terms() == {"dequant_ops_per_elem": 1.0}
    assert fitted_terms("kivi/lmdeploy") == before


# -- the cost model's new parts: CUDA-core work, host time, engine floors --------------------------

@dataclasses.dataclass(frozen=True)
class _AluOnly(Method):
    """A test method whose decode attention is only CUDA-core work (and a host wait)."""
    name = ""

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        return Work(alu_ops=1e6 * kept_tokens_sum, host_s=1e-5)


def test_alu_and_host_work_are_costed_at_the_fp32_rate_and_added():
    roof = RooflineCost(L7, A6000, _AluOnly())
    t = roof.attention_time_s(Work(alu_ops=3.87e10), 1)
    assert t == pytest.approx(3.87e10 / 38.7e12 + roof._seq_ko + roof._attn_ko)
    assert roof._t(Work(host_s=2e-3)) == 2e-3  # host time alone: no kernel
    w = Work(bytes=1e9, alu_ops=1.0, host_s=1e-3)
    assert roof._t(w) == pytest.approx(1e9 / roof._bw + roof._ko + 1e-3)
    # the per-step decode function (fast-forward's path) equals the step costing, host and ALU included
    for b, kept in ((1, 500), (8, 8 * 3000)):
        assert roof.decode_step_time_s(b, kept) == pytest.approx(roof.step_time_s(StepShape(b, kept, [])))


def test_engine_floor_hides_dense_gpu_work_but_not_attention():
    params = engine_params("lmdeploy-0.6")
    roof = RooflineCost(L7, A6000, parse_method("none"), params=params)
    plain = RooflineCost(L7, A6000, parse_method("none"), params=dataclasses.replace(params, host_floor_step_s=0.0,
                                                                                    host_floor_prefill_token_s=0.0))
    dense = plain.dense_time_s(1, 1) - params.step_overhead_s
    assert params.host_floor_step_s > dense  # 7B decode is host-bound in this engine
    assert roof.dense_time_s(1, 1) == pytest.approx(params.host_floor_step_s + params.step_overhead_s)
    # attention adds on top of the floor
    a = roof.decode_step_time_s(1, 4000) - roof.decode_step_time_s(1, 100)
    assert a == pytest.approx(plain.decode_step_time_s(1, 4000) - plain.decode_step_time_s(1, 100))
    # prefill: the floor grows per prompt token
    t1 = roof.dense_time_s(1024, 1, prefill_tokens=1024)
    assert t1 >= params.host_floor_step_s + 1024 * params.host_floor_prefill_token_s
    assert engine_params(None) is None and engine_params("vllm") is None
    with pytest.raises(ConfigError, match="unknown engine 'sglang'"):
        engine_params("sglang")


def test_fp8_triton_path_reproduces_its_published_a100_kernel_ratio():
    """vllm-project/vllm#45829: on an A100, 64 sequences x 2048 tokens, 8 query and 2 KV heads of 128,
    the lookup-table fp8 Triton kernel took 483.9 us against 301.8 us for bf16 (1.60x)."""
    shape = dataclasses.replace(load_model("llama-3.1-8b"), num_attention_heads=8, num_kv_heads=2, head_dim=128)
    a100 = load_hardware("a100")
    k = {impl: RooflineCost(shape, a100, parse_method(f"fp8:impl={impl}") if impl != "none" else parse_method("none"))
         for impl in ("none", "triton", "software")}
    t = {i: c.decode_kernel_s(64, 64 * 2048) for i, c in k.items()}
    assert t["triton"] / t["none"] == pytest.approx(483.9 / 301.8, rel=0.1)
    # the default software path: the conversion hides under the halved traffic
    assert t["software"] < t["none"]


def test_fp8_resolves_to_software_dequant_without_fp8_tensor_cores():
    assert RooflineCost(L7, A6000, parse_method("fp8")).method.impl == "software"
    assert RooflineCost(L7, H100, parse_method("fp8")).method.impl == "native"
    sw = RooflineCost(L7, load_hardware("a100"), parse_method("fp8:impl=triton"))
    nat = RooflineCost(L7, load_hardware("a100"), parse_method("fp8:impl=native"))
    assert sw.decode_step_time_s(64, 64 * 2048) > nat.decode_step_time_s(64, 64 * 2048)


# -- what the measured implementations say (the seed paper's findings) ------------------------------

def _ratio(method, b, p, stage, model=L7, hw=A6000, engine="lmdeploy-0.6"):
    params = engine_params(engine)
    none = RooflineCost(model, hw, parse_method("none"), params=params)
    meth = RooflineCost(model, hw, parse_method(method), params=params)
    return (mf.fixed_batch_throughput(meth, meth.method, b, p, stage)
            / mf.fixed_batch_throughput(none, none.method, b, p, stage))


def test_four_bit_kv_gives_no_decode_gain_at_small_batch_on_the_measured_engine():
    for method in ("kivi:bits=4", "gear"):
        for b, p in ((8, 4000), (16, 3072)):
            assert _ratio(method, b, p, "decoding") == pytest.approx(1.0, abs=0.06)
    # the first-principles reference predicts a large gain on the same engine: the finding it missed
    assert _ratio("kivi:bits=4,impl=reference", 16, 3072, "decoding") > 1.3


def test_h2o_prefill_loses_most_at_short_prompts_and_snapkv_is_not_free():
    short, long_ = _ratio("h2o:budget=512,window=448", 1, 256, "prefill"), _ratio("h2o:budget=512,window=448", 1, 4000, "prefill")
    assert short < 0.85 < long_ < 1.0
    assert _ratio("h2o:budget=512,window=448", 1, 1024, "prefill") < _ratio("h2o:budget=512,window=448", 16, 1024, "prefill")
    # SnapKV's window scoring: nothing below the budget, a large share of prefill at 512 tokens and above
    assert _ratio("snapkv:budget=256,window=32", 1, 200, "prefill") == pytest.approx(1.0)
    assert _ratio("snapkv:budget=256,window=32", 1, 512, "prefill") < 0.9
    assert _ratio("snapkv:budget=256,window=32,impl=reference", 1, 1024, "prefill") > 0.95


def test_eviction_then_growth_speeds_decode_only_at_long_contexts():
    assert _ratio("streamingllm:sink=64,window=448", 16, 3072, "decoding") > 1.5
    assert _ratio("streamingllm:sink=64,window=448", 1, 256, "decoding") == pytest.approx(1.0)


# -- the fit ------------------------------------------------------------------------------------------

def test_fixed_batch_decode_drops_min_and_max_like_the_source():
    class Cost:
        method = parse_method("none")

        def decode_step_time_s(self, b, kept):
            return {4 * 101: 1.0, 4 * 103: 9.0}.get(kept, 2.0)

    assert mf.fixed_batch_throughput(Cost(), Cost.method, 4, 100, "decoding", decode_steps=4) == pytest.approx(4 / 2.0)


def test_fit_recovers_known_terms_from_synthetic_measurements(tmp_path):
    """kvsim's own predictions with known engine parameters and H2O terms, written as a seed-format CSV:
    the fit must give the terms back (the problem is identified and the code is right)."""
    truth = {"score_host_step_s": 4e-4, "score_bytes_per_token": 3e5}
    params = engine_params("lmdeploy-0.6")
    pred = mf.Predictor(params)
    rows = []
    with trial_terms({"h2o/lmdeploy": truth}):
        for label in ("None-16", "H2O-16"):
            for b in (1, 2, 4, 8, 16):
                for p in (256, 512, 1024, 2048):
                    pt = mf.Point("llama-2-7b", label, "prefill", b, p, 0.0)
                    rows.append(["meta-llama-Llama-2-7b-hf", label, b, p, "prefill", pred.throughput(pt)])
    path = tmp_path / "synthetic.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "bsz", "prompt_len", "stage", "tokens_per_s"])
        w.writerows(rows)
    got = mf.fit_terms(mf.load_points(path), "h2o/lmdeploy", params, ["llama-2-7b"])
    for k, v in truth.items():
        assert got[k] == pytest.approx(v, rel=2e-3), k


def test_load_points_names_file_and_line(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("model,method,bsz,prompt_len,stage,tokens_per_s\n"
                   "meta-llama-Llama-2-7b-hf,None-16,x,256,prefill,1.0\n")
    with pytest.raises(ConfigError, match=r"t\.csv:2"):
        mf.load_points(bad)
    other = tmp_path / "o.csv"
    other.write_text("model,method,bsz,prompt_len,stage,tokens_per_s\nmistralai-Mistral-7B,None-16,1,256,prefill,1.0\n")
    with pytest.raises(ConfigError, match="no Llama-2-7B/13B rows"):
        mf.load_points(other)


@needs_seed
@pytest.mark.slow
def test_committed_terms_recompute_from_the_seed_data(tmp_path):
    """Every fitted term and engine parameter, refitted from the data, equals the committed file; and
    the leave-one-model-out errors it reports are the ones recomputed here."""
    result = mf.run(SEED, progress=False)
    mf.write_outputs(result, tmp_path, data_path="../shared/reference/seed-lmdeploy/throughput.csv", plot=False)
    fresh = yaml.safe_load((tmp_path / "method_terms.yaml").read_text())
    committed = load_terms_file()
    for key, entry in committed["implementations"].items():
        for term, value in entry["terms"].items():
            assert fresh["implementations"][key]["terms"][term] == pytest.approx(value, rel=1e-3, abs=1e-12), (key, term)
        assert fresh["implementations"][key]["leave_one_model_out"] == entry["leave_one_model_out"]
    for k, v in committed["engines"]["lmdeploy-0.6"]["params"].items():
        got = fresh["engines"]["lmdeploy-0.6"]["params"][k]
        assert got == pytest.approx(v, rel=1e-3) if isinstance(v, float) else got == v, k
    # the FP16 baseline of that setup: within 10 % (p90) of the measured absolute throughput
    for where, e in committed["engines"]["lmdeploy-0.6"]["fit_error_pct"].items():
        assert e["p90_pct"] <= 10.0, where
    # method / FP16 ratios on the withheld model: median within 5 % for every method and stage
    for key, entry in committed["implementations"].items():
        for fold, res in entry["leave_one_model_out"].items():
            for stage, e in res["error_pct"].items():
                assert e["median_pct"] <= 5.0, (key, fold, stage)


# -- kvsim bench sweeps ---------------------------------------------------------------------------

def test_bench_sweep_cli_writes_csv_json_and_ratios(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["bench", "--model", "llama-2-7b", "--hardware", "rtx-a6000", "--engine", "lmdeploy-0.6",
               "--method", "none,kivi:bits=4,h2o:budget=512,window=448", "--batch-size", "1,16",
               "--prompt-len", "256,1024", "--output-len", "16", "--out", str(out), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert len(rows) == 3 * 2 * 2 and json.loads((out / "bench.json").read_text())[0]["engine"] == "lmdeploy-0.6"
    none = [r for r in rows if r["method"] == "none"]
    assert all(float(r["prefill_ratio_to_none"]) == 1.0 for r in none)
    h2o = {(int(r["batch_size"]), int(r["prompt_len"])): float(r["prefill_ratio_to_none"]) for r in rows
           if r["method"].startswith("h2o")}
    assert h2o[(1, 256)] < h2o[(1, 1024)] < 1.0
    assert "prefill/none" in capsys.readouterr().out


def test_bench_grid_file_and_bad_keys(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: llama-2-7b\nhardware: rtx-a6000\nmethod: [none, fp8]\nbatch_size: [1, 4]\nprompt_len: 512\n"
                    "output_len: 8\n")
    assert main(["bench", "--grid", str(grid), "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["batch_size"]) for r in rows] == [("none", 1), ("none", 4), ("fp8:impl=software", 1),
                                                              ("fp8:impl=software", 4)]
    grid.write_text("method: none\nbatchsize: 4\n")
    assert main(["bench", "--grid", str(grid)]) == 2
    assert "unknown key(s) 'batchsize'" in capsys.readouterr().err
    assert main(["bench", "--batch-size", "1,x"]) == 2
    assert "'x' is not an integer" in capsys.readouterr().err


def test_single_point_json_keeps_its_shape(capsys):
    assert main(["bench", "--model", "llama-2-7b", "--hardware", "rtx-a6000", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batch_size"] == 8 and r["prompt_len"] == 1024 and r["decode_throughput"] > 0


# -- the kvprof H200 profiles: which implementation they timed, and when kvsim uses them ----------------

KVPROF = ROOT / "kvsim" / "profiles" / "kvprof" / "h200__llama-2-7b__tp1.json"


def test_kvprof_profiles_are_not_picked_without_being_asked():
    from kvsim import api
    from kvsim.cost.profiled import find_profile

    assert find_profile("llama-3.1-8b", "h200", 1) is None and find_profile("llama-2-7b", "h200", 1) is None
    assert find_profile("llama-2-7b", "h100", 1) is not None  # imported real-engine timings still are
    spec = api.make_spec("llama-2-7b", "h200", "none", profile=str(KVPROF))
    assert api.make_cost(spec).name == "profile h200-llama-2-7b-tp1-kvprof"


def test_profile_method_tables_apply_only_to_the_implementation_they_timed():
    from kvsim.cost.profile import load_profile
    from kvsim.cost.profiled import ProfiledCost

    prof = load_profile(KVPROF)
    assert prof.provenance["implementations"]["kivi"] == "reference"
    h200 = load_hardware("h200")

    def cost(spec):
        return ProfiledCost(prof, RooflineCost(L7, h200, parse_method(spec)))

    assert cost("kivi:bits=4,impl=reference")._decode is prof.tables["attention.decode.kivi"]
    lm = cost("kivi:bits=4")
    assert lm._decode is None and lm._decode_scaled is prof.tables["attention.decode.none"]
    assert cost("streamingllm:impl=sliding")._extra_prefill is prof.tables["extra.prefill.streamingllm"]
    assert cost("streamingllm")._extra_prefill is None
