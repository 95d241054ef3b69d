"""The pieces issue 15 added to reproduce real vLLM serving on H100: prompt identity inferred from a
repeating prompt cycle, the client-side overhead of HTTP-timed cases, the profile-engine rule, vLLM's
NVLink all-reduce, and tensor parallelism that scales from first principles to TP 8 and unseen models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kvsim import validate as V
from kvsim.cost.base import StepShape
from kvsim.cost.profile import load_profile
from kvsim.cost.roofline import RooflineCost, calibrated_params
from kvsim.specs.hardware import load_hardware
from kvsim.specs.model import load_model
from kvsim.workload.request import Request

from test_validate import DECODE_STEP, PREFILL_STEP, REQS, make_case

PROFILES = Path(__file__).resolve().parents[1] / "kvsim" / "profiles" / "imported"


# -- prompt identity from a repeating cycle -------------------------------------------------------------
def _reqs(lengths):
    return [Request(f"r{i}", float(i), n, 4) for i, n in enumerate(lengths)]


def test_a_prompt_cycle_gives_each_resend_its_prompts_hashes():
    cycle = [40, 57, 33, 90, 61]
    lengths = cycle * 16
    lengths[12] = 58  # one resend whose length does not match its slot: left alone
    reqs = _reqs(lengths)
    rep = V.repeated_prompts(reqs, block_tokens=16)
    assert rep.period == 5 and rep.shared == 79 and rep.total == 80
    assert reqs[12].prefix_hashes is None
    for i in range(5, 80):
        if i != 12 and i - 5 != 12:
            assert reqs[i].prefix_hashes == reqs[i - 5].prefix_hashes
    assert len(reqs[3].prefix_hashes) == 90 // 16  # full blocks only
    # different prompts never share a block
    assert not set(reqs[0].prefix_hashes) & set(reqs[3].prefix_hashes)


def test_no_cycle_or_known_hashes_leave_the_workload_alone():
    assert V.repeated_prompts(_reqs([17 + (i * 37) % 101 for i in range(60)])) is None
    assert V.repeated_prompts(_reqs([64] * 40)) is None  # one length says nothing about identity
    reqs = _reqs([40, 57] * 10)
    reqs[0].prefix_hashes = (1, 2)
    assert V.repeated_prompts(reqs) is None


# -- where a case was timed, and the client overhead ---------------------------------------------------------
def _drop_queue_column(case_dir: Path) -> None:
    rows = list(csv.DictReader(open(case_dir / "measured.csv")))
    with open(case_dir / "measured.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "queue_ms"])
        w.writeheader()
        for r in rows:
            r.pop("queue_ms")
            w.writerow(r)


@pytest.mark.parametrize("extra, drop_queue, want_ms", [
    ("", False, 0.0),                                   # engine-side times (queue_ms recorded)
    ("", True, V.CLIENT_OVERHEAD_MS),                   # client-side times
    ("measured_at: engine\n", True, 0.0),
    ("client_overhead_ms: 2.5\n", True, 2.5),
])
def test_client_overhead_is_added_to_ttft_and_e2el_only(tmp_path, extra, drop_queue, want_ms):
    case_dir = make_case(tmp_path, run_extra=extra)
    if drop_queue:
        _drop_queue_column(case_dir)
    res = V.validate([case_dir], None, profile=tmp_path / "const-profile.json")[0]
    assert res.diagnostics["client_overhead_ms"] == want_ms
    for rid, p, o, t in REQS:
        j = next(x for x in res.joined if x["request_id"] == rid)
        assert j["predicted_ttft_ms"] == pytest.approx(PREFILL_STEP * 1e3 + want_ms, rel=1e-9)
        assert j["predicted_e2el_ms"] == pytest.approx((PREFILL_STEP + (o - 1) * DECODE_STEP) * 1e3 + want_ms, rel=1e-9)
        assert j["predicted_tpot_ms"] == pytest.approx(DECODE_STEP * 1e3, rel=1e-9)


def test_bad_measured_at_names_the_file(tmp_path):
    case_dir = make_case(tmp_path, run_extra="measured_at: gateway\n")
    with pytest.raises(Exception, match="measured_at"):
        V.validate([case_dir], None, profile=tmp_path / "const-profile.json")


# -- which profile a case uses ------------------------------------------------------------------------------------
def test_profile_engines():
    assert V.profile_engine(load_profile(PROFILES / "h100__llama-2-7b__tp1.json")) == "sarathi"
    assert V.profile_engine(load_profile(PROFILES / "rtx-4090__llama-3.1-8b__tp1.json")) == "vllm"


def test_a_vllm_case_does_not_use_a_sarathi_profile(tmp_path):
    (tmp_path / "w.jsonl").write_text(json.dumps({"request_id": "a", "arrival_time_s": 0.0, "prompt_tokens": 8,
                                                  "output_tokens": 2}) + "\n")
    (tmp_path / "run.yaml").write_text("engine: vllm\nmodel: meta-llama/Llama-2-7b-hf\ngpu:\n  sku: NVIDIA H100 80GB HBM3\n"
                                       "workload: w.jsonl\n")
    (tmp_path / "measured.csv").write_text("request_id,arrival_time_s,prompt_tokens,output_tokens,ttft_ms,tpot_ms,e2el_ms\n"
                                           "a,0,8,2,10,5,15\n")
    case = V.load_case(tmp_path)
    spec = V.resolve_spec(case)
    assert spec.profile is None and spec.skipped_profile == "h100-llama-2-7b-tp1-vidur"
    assert spec.roofline_params == calibrated_params("h100")
    # asked for by path, the profile is used
    spec = V.resolve_spec(case, profile=PROFILES / "h100__llama-2-7b__tp1.json")
    assert spec.profile is not None


# -- vLLM's all-reduce over NVLink, and tensor parallelism --------------------------------------------------
def test_nvlink_all_reduce_one_and_two_shot():
    hw = load_hardware("h100")
    a, bw = hw.allreduce_latency_s, hw.allreduce_bw_bytes_per_s
    assert (a, bw) == (6.45e-6, 396e9)
    roof = RooflineCost(load_model("llama-2-70b"), hw, None, 4, calibrated_params("h100"))
    small, big = 256 * 1024, 8 * 1024 * 1024
    assert roof.collective_time_s(small, 4) == pytest.approx(a + 3 * small / bw)        # one shot
    assert roof.collective_time_s(big, 4) == pytest.approx(2 * a + 1.5 * big / bw)      # two shots
    assert roof.collective_time_s(small, 2) == pytest.approx(a + small / bw)
    assert roof.collective_time_s(small, 1) == 0.0
    # a GPU without the figure keeps the NCCL ring fitted on Vidur's tables
    a100 = RooflineCost(load_model("llama-2-70b"), load_hardware("a100"), None, 4, calibrated_params("a100"))
    p = a100.params
    assert a100.collective_time_s(small, 4) == pytest.approx(
        p.allreduce_latency_s + 1.5 * small / (load_hardware("a100").interconnect_bw_bytes_per_s * p.eff_comm))


@pytest.mark.parametrize("model", ["llama-2-70b", "codellama-34b", "llama-3.1-70b"])
def test_tensor_parallel_splits_weights_kv_and_adds_two_all_reduces_per_layer(model):
    m, hw, p = load_model(model), load_hardware("h100"), calibrated_params("h100")
    costs = {tp: RooflineCost(m, hw, None, tp, p) for tp in (1, 2, 4, 8)}
    T = 16
    for tp, c in costs.items():
        w1, w = costs[1].linear_works(T), c.linear_works(T)
        # each rank streams 1/tp of the layer's weights (activations are replicated)
        weights = {op: w[op].bytes - c.linear_works(0)[op].bytes for op in ("qkv", "o", "mlp")}
        for op in ("qkv", "o", "mlp"):
            assert c.linear_works(0)[op].bytes == pytest.approx(costs[1].linear_works(0)[op].bytes / tp)
            assert w[op].flops == pytest.approx(w1[op].flops / tp)
            assert weights[op] >= 0
        # KV read per rank: kv heads split (never below one head per rank)
        kv = c.method.decode_attention_work(m, tp, 8, 8 * 1000).bytes
        assert kv == pytest.approx(costs[1].method.decode_attention_work(m, 1, 8, 8 * 1000).bytes
                                   * max(1, m.num_kv_heads // tp) / m.num_kv_heads)
        # two all-reduces per layer of the step's hidden states
        nbytes = T * m.hidden_size * m.dtype_bytes
        assert c.allreduce_time_s(T) == pytest.approx(2 * c.collective_time_s(nbytes, tp))
    # a decode step gets faster with TP but by less than 1/tp (collectives and fixed kernel time)
    t = {tp: c.decode_step_time_s(32, 32 * 1000) for tp, c in costs.items()}
    assert t[1] > t[2] > t[4] > t[8]
    assert t[8] > t[1] / 8


def test_unseen_hopper_models_fit_and_run(tmp_path):
    """The hidden cases' models load from their Hugging Face ids and fit their TP degree on H100."""
    assert V.model_name("meta-llama/Llama-2-70b-hf", "x") == "llama-2-70b"
    assert V.model_name("codellama/CodeLlama-34b-hf", "x") == "codellama-34b"
    from kvsim import api
    from kvsim.config import EngineConfig

    for model, tp in (("llama-2-70b", 4), ("codellama-34b", 2)):
        spec = api.make_spec(model, "h100", None, EngineConfig(tensor_parallel_size=tp, max_model_len=4096))
        res = api.replay([Request("a", 0.0, 600, 50), Request("b", 0.01, 600, 50)], spec=spec)
        assert res.summary["completed"] == 2 and res.summary["rejected"] == 0
