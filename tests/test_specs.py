"""Model and hardware specs: hand counts against published figures, TP/EP splits, the shipped data files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from kvsim.errors import ConfigError, UnknownNameError
from kvsim.specs import HardwareSpec, ModelSpec, load_hardware, load_model
from kvsim.specs.hardware import FIGURE_KEYS, OPTIONAL_FIGURE_KEYS, known_hardware
from kvsim.specs.model import known_models

SHIPPED_MODELS = {
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "codellama-34b", "llama-3-8b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b-v0.1",
    "qwen2.5-7b", "qwen3-32b", "qwen3-30b-a3b", "mixtral-8x7b", "smollm2-135m",
}
SHIPPED_GPUS = {"a100", "h100", "h200", "l40s", "rtx-a6000", "a40", "rtx-pro-6000", "rtx-4090"}
DATA = resources.files("kvsim.specs").joinpath("data")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------------------------- models
def test_every_shipped_model_loads():
    assert set(known_models()) == SHIPPED_MODELS
    for name in SHIPPED_MODELS:
        m = load_model(name)
        assert isinstance(m, ModelSpec) and m.name == name
        assert m.num_params > 0 and m.kv_bytes_per_token() > 0
        assert m.num_attention_heads % m.num_kv_heads == 0


def test_shipped_files_are_upstream_config_json():
    """Plain HF config.json files: JSON objects with the HF bookkeeping keys and nothing kvsim-specific."""
    for name in SHIPPED_MODELS:
        cfg = json.loads(DATA.joinpath(f"models/{name}.json").read_text())
        assert isinstance(cfg, dict)
        assert cfg["architectures"] and cfg["model_type"] and cfg["transformers_version"]
        assert not any(k.startswith("kvsim") for k in cfg)


# (layers, hidden, heads, kv heads, head_dim, intermediate, vocab, tied, dtype, max positions, window)
ARCH = {
    "llama-2-7b": (32, 4096, 32, 32, 128, 11008, 32000, False, "float16", 4096, 0),
    "llama-2-13b": (40, 5120, 40, 40, 128, 13824, 32000, False, "float16", 4096, 0),
    "llama-3-8b": (32, 4096, 32, 8, 128, 14336, 128256, False, "bfloat16", 8192, 0),
    "llama-3.1-8b": (32, 4096, 32, 8, 128, 14336, 128256, False, "bfloat16", 131072, 0),
    "llama-3.1-70b": (80, 8192, 64, 8, 128, 28672, 128256, False, "bfloat16", 131072, 0),
    "mistral-7b-v0.1": (32, 4096, 32, 8, 128, 14336, 32000, False, "bfloat16", 32768, 4096),
    "qwen2.5-7b": (28, 3584, 28, 4, 128, 18944, 152064, False, "bfloat16", 131072, 0),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, 151936, False, "bfloat16", 40960, 0),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 6144, 151936, False, "bfloat16", 262144, 0),
    "mixtral-8x7b": (32, 4096, 32, 8, 128, 14336, 32000, False, "bfloat16", 32768, 0),
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 49152, True, "bfloat16", 8192, 0),
}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_from_hf_config_reads_each_shipped_model(name):
    m = load_model(name)
    got = (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads, m.head_dim,
           m.intermediate_size, m.vocab_size, m.tie_word_embeddings, m.dtype, m.max_position_embeddings,
           m.sliding_window)
    assert got == ARCH[name]


def test_qwen3_explicit_head_dim_differs_from_hidden_over_heads():
    q32, moe = load_model("qwen3-32b"), load_model("qwen3-30b-a3b")
    assert q32.hidden_size // q32.num_attention_heads == 80 and q32.head_dim == 128
    assert moe.hidden_size // moe.num_attention_heads == 64 and moe.head_dim == 128
    assert q32.q_size == 64 * 128 != q32.hidden_size


def test_moe_fields():
    q = load_model("qwen3-30b-a3b")
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size, q.num_shared_experts) == (128, 8, 768, 0)
    mx = load_model("mixtral-8x7b")  # num_local_experts, and intermediate_size is the expert width
    assert (mx.num_experts, mx.num_experts_per_tok, mx.moe_intermediate_size, mx.num_shared_experts) == (8, 2, 14336, 0)
    assert mx.is_moe and q.is_moe and not load_model("llama-3.1-8b").is_moe
    dense = load_model("llama-3.1-8b")
    assert dense.active_params == dense.num_params


# ---- hand counts: params exclude norm weights and biases (< 0.1 %) --------------------------------------
def test_llama31_8b_hand_count():
    m = load_model("llama-3.1-8b")
    h, kv, i, v, L = 4096, 8 * 128, 14336, 128256, 32
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    assert m.num_params == L * per_layer + 2 * v * h
    # Hugging Face reports 8,030,261,248 including 32*2*4096 + 4096 = 266,240 RMSNorm weights
    assert m.num_params == 8_030_261_248 - 266_240
    assert rel(m.num_params, 8.03e9) < 0.005
    assert m.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    assert m.weight_bytes() == 2 * m.num_params


def test_llama2_7b_hand_count():
    m = load_model("llama-2-7b")
    assert m.kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 524288
    assert m.num_params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096
    assert rel(m.num_params, 6.74e9) < 0.005  # HF: 6,738,415,616 incl. norms


def test_llama31_70b_hand_count():
    m = load_model("llama-3.1-70b")
    assert rel(m.num_params, 70.6e9) < 0.005
    assert m.kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2 == 327680


def test_qwen3_30b_a3b_total_and_active():
    m = load_model("qwen3-30b-a3b")
    h, q, kv, ie, E, k, L, v = 2048, 32 * 128, 4 * 128, 768, 128, 8, 48, 151936
    attn = h * (q + 2 * kv) + q * h
    expert, router = 3 * h * ie, h * E
    assert m.num_params == L * (attn + E * expert + router) + 2 * v * h
    assert m.active_params == L * (attn + k * expert + router) + 2 * v * h
    assert rel(m.num_params, 30.5e9) < 0.005  # model card: 30.5B total
    assert rel(m.active_params, 3.3e9) < 0.02  # model card: 3.3B activated (rounded to 0.1B)
    assert m.kv_bytes_per_token() == 2 * 48 * 4 * 128 * 2 == 98304


def test_mixtral_total_and_active():
    m = load_model("mixtral-8x7b")
    assert rel(m.num_params, 46.7e9) < 0.005
    assert rel(m.active_params, 12.9e9) < 0.01
    assert m.kv_bytes_per_token() == 131072


def test_tied_embeddings_counted_once():
    m = load_model("smollm2-135m")
    h, kv, i, v, L = 576, 3 * 64, 1536, 49152, 30
    assert m.num_params == L * (h * (h + 2 * kv) + h * h + 3 * h * i) + v * h
    assert m.num_params == 134_515_008 - (2 * L * h + h)  # HF count minus RMSNorm weights


def test_qwen3_32b_kv_bytes():
    assert load_model("qwen3-32b").kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2 == 262144
    assert load_model("qwen3-32b").kv_bytes_per_token(kv_dtype_bytes=1) == 131072


# ---- tensor / expert parallel splits ------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_splits_weights_and_kv_of_dense_model(tp):
    m = load_model("llama-3.1-70b")
    assert m.weight_bytes(tensor_parallel_size=tp) == pytest.approx(2 * m.num_params / tp, rel=1e-9)
    assert m.kv_bytes_per_token(tensor_parallel_size=tp) == 327680 / tp


def test_kv_heads_replicate_when_tp_exceeds_them():
    m = load_model("qwen3-30b-a3b")  # 4 KV heads: TP 8 keeps one (replicated) head per rank
    one_head = 2 * 48 * 1 * 128 * 2
    assert m.kv_bytes_per_token(tensor_parallel_size=4) == one_head
    assert m.kv_bytes_per_token(tensor_parallel_size=8) == one_head
    assert load_model("llama-3.1-8b").kv_bytes_per_token(tensor_parallel_size=16) == 2 * 32 * 128 * 2


def test_tp_and_ep_split_of_moe_weights():
    m = load_model("mixtral-8x7b")
    full = m.weight_bytes()
    assert full == pytest.approx(2 * m.num_params, rel=1e-9)
    assert m.weight_bytes(tensor_parallel_size=2) == pytest.approx(full / 2, rel=1e-9)
    experts = m.num_layers * m.num_experts * m.expert_params * 2
    rest = full - experts
    assert m.weight_bytes(tensor_parallel_size=2, expert_parallel_size=4) == pytest.approx(
        rest / 2 + experts / 8, rel=1e-9)


# ---- names and paths -------------------------------------------------------------------------------------
def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        load_model("gpt-5")
    assert isinstance(e.value, ValueError)
    for name in SHIPPED_MODELS:
        assert name in str(e.value)


def test_short_names_ignore_case():
    assert load_model("Llama-3.1-8B").name == "llama-3.1-8b"


def test_config_json_path(tmp_path):
    cfg = json.loads(DATA.joinpath("models/llama-3.1-8b.json").read_text())
    folder = tmp_path / "My-Llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    by_file = load_model(str(folder / "config.json"))
    by_dir = load_model(str(folder))
    assert by_file.name == by_dir.name == "My-Llama"
    assert by_file.num_params == load_model("llama-3.1-8b").num_params
    other = tmp_path / "tiny.json"
    other.write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    assert load_model(str(other)).name == "tiny" and load_model(str(other)).num_layers == 2


def test_bad_config_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"hidden_size\": 4096,,\n}")
    with pytest.raises(ConfigError, match=r"bad.json:2"):
        load_model(str(bad))
    cfg = json.loads(DATA.joinpath("models/qwen3-30b-a3b.json").read_text())
    for broken, match in [
        ({k: v for k, v in cfg.items() if k != "vocab_size"}, "vocab_size"),
        ({k: v for k, v in cfg.items() if k != "num_experts_per_tok"}, "num_experts_per_tok"),
        (dict(cfg, num_key_value_heads=5), "multiple"),
        (dict(cfg, torch_dtype="int4"), "torch_dtype"),
        (dict(cfg, num_hidden_layers=0), "num_hidden_layers"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ModelSpec.from_hf_config(broken)


def test_newer_dtype_key_and_torch_prefix():
    cfg = json.loads(DATA.joinpath("models/qwen3-32b.json").read_text())
    cfg.pop("torch_dtype")
    assert ModelSpec.from_hf_config(dict(cfg, dtype="bfloat16")).dtype == "bfloat16"
    assert ModelSpec.from_hf_config(dict(cfg, dtype="torch.float16")).dtype_bytes == 2


# ------------------------------------------------------------------------------------------- hardware
def _yaml() -> dict:
    return yaml.safe_load(DATA.joinpath("hardware.yaml").read_text())


def test_every_gpu_loads():
    assert set(known_hardware()) == SHIPPED_GPUS
    for name in SHIPPED_GPUS:
        hw = load_hardware(name)
        assert isinstance(hw, HardwareSpec) and hw.name == name


def test_every_figure_has_a_source():
    table = _yaml()
    for name in SHIPPED_GPUS:
        e = table[name]
        figures = [k for k in FIGURE_KEYS] + [k for k in OPTIONAL_FIGURE_KEYS if k in e]
        for key in figures:
            assert key in e, (name, key)
            src = e["sources"].get(key, "")
            assert "http" in src and len(src) > 40, (name, key)
        assert set(e["sources"]) <= set(figures), name  # no source for a figure that is not there


def test_sane_magnitudes():
    for name in SHIPPED_GPUS:
        e, hw = _yaml()[name], load_hardware(name)
        assert 16e9 <= hw.memory_bytes <= 200e9, name
        assert 500e9 <= hw.mem_bw_bytes_per_s <= 10e12, name
        assert 100e12 <= hw.fp16_flops <= 2.5e15, name
        assert hw.fp8_flops == 0 or 1.9 * hw.fp16_flops <= hw.fp8_flops <= 2.1 * hw.fp16_flops, name
        assert 16e9 <= hw.interconnect_bw_bytes_per_s <= 1e12, name
        if "memory_bytes" in e:  # CUDA-visible bytes are within a few % of the vendor's "80 GB"
            assert abs(e["memory_bytes"] / (e["memory_gb"] * 1e9) - 1) < 0.10, name
            assert hw.memory_bytes == e["memory_bytes"]
        else:
            assert hw.memory_bytes == int(e["memory_gb"] * 1e9)


def test_datasheet_figures():
    h100 = load_hardware("h100")
    assert (h100.mem_bw_bytes_per_s, h100.fp16_flops, h100.fp8_flops, h100.interconnect_bw_bytes_per_s) == (
        3350e9, 989.4e12, 1978.9e12, 450e9)
    assert h100.memory_bytes == 85_045_477_376
    # GeForce: FP32-accumulate rate (half the FP16-accumulate headline), fp8 likewise
    g = load_hardware("rtx-4090")
    assert g.fp16_flops == 165.2e12 and g.fp8_flops == 330.3e12
    for ampere in ("a100", "a40", "rtx-a6000"):
        assert load_hardware(ampere).fp8_flops == 0 and not load_hardware(ampere).supports_fp8
    assert load_hardware("h200").supports_fp8
    assert load_hardware("rtx-pro-6000").interconnect_bw_bytes_per_s == 64e9  # PCIe Gen5 x16, one way
    assert load_hardware("l40s").interconnect_bw_bytes_per_s == 32e9  # PCIe Gen4 x16, one way


def test_collective_figures():
    """Only the RTX PRO 6000 carries its machine's collective figure (LLMServingSim's link model of the
    2-GPU PCIe box: 16 GiB/s = 17.18 GB/s and 20 us per ring step); the others keep interconnect x eff_comm."""
    hw = load_hardware("rtx-pro-6000")
    assert hw.collective_bw_bytes_per_s == 17.18e9 and hw.collective_latency_s == pytest.approx(20e-6)
    assert hw.collective_bw_bytes_per_s == pytest.approx(16 * 2**30, rel=1e-3)
    for name in SHIPPED_GPUS - {"rtx-pro-6000"}:
        h = load_hardware(name)
        assert h.collective_bw_bytes_per_s is None and h.collective_latency_s is None, name


@pytest.mark.parametrize("entry, match", [
    ({"collective_gb_s": 17.18}, "collective_gb_s = 17.18 needs its pair"),
    ({"collective_latency_us": 20}, "collective_latency_us = 20 needs its pair"),
    ({"collective_gb_s": 0, "collective_latency_us": 20}, "collective_gb_s = 0 must be positive"),
    ({"collective_gb_s": "fast", "collective_latency_us": 20}, "collective_gb_s = 'fast' is not a number"),
])
def test_collective_figures_are_checked(monkeypatch, entry, match):
    from kvsim.specs import hardware as H

    base = dict(_yaml()["l40s"], **entry)
    monkeypatch.setattr(H, "_raw_table", lambda: {"box": base})
    with pytest.raises(ConfigError, match=match):
        load_hardware("box")


def test_aliases_and_spelling():
    assert load_hardware("h100-sxm") == load_hardware("h100")
    assert load_hardware("A100-80GB").name == "a100"
    assert load_hardware("H100_SXM").name == "h100"
    assert load_hardware("4090").name == "rtx-4090"
    aliases = _yaml()["aliases"]
    assert not set(map(str, aliases)) & SHIPPED_GPUS
    assert set(aliases.values()) <= SHIPPED_GPUS


def test_unknown_hardware_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        load_hardware("b200")
    assert isinstance(e.value, ValueError)
    for name in SHIPPED_GPUS:
        assert name in str(e.value)


def test_readme_gives_provenance_for_every_file():
    # read from the source tree: README.md is documentation, not package data
    readme = (Path(__file__).resolve().parents[1] / "kvsim/specs/data/README.md").read_text()
    for name in SHIPPED_MODELS | SHIPPED_GPUS:
        assert f"`{name}`" in readme, name
