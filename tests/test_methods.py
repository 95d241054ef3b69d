"""Contracts every compression method keeps, plus hand counts for the formulas (issue 3)."""

from __future__ import annotations

import math

import pytest

from kvsim.work import Work
from kvsim.errors import ConfigError
from kvsim.methods import all_methods, make_method, parse_method, parse_method_list
from kvsim.methods.base import LengthRatio, length_ratio_from_tail_shares
from kvsim.cli.listing import format_methods
from kvsim.specs.model import ModelSpec

#: llama-3.1-8b shape, built directly so the hand counts do not depend on a shipped file
LLAMA8B = ModelSpec(name="llama-3.1-8b-like", num_layers=32, hidden_size=4096, num_attention_heads=32,
                    num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256, dtype="bfloat16")
#: an MHA model with a head_dim that group sizes do not divide, to exercise the ceil in KIVI's formula
ODD = ModelSpec(name="odd", num_layers=3, hidden_size=480, num_attention_heads=6, num_kv_heads=6, head_dim=80,
                intermediate_size=1024, vocab_size=1000, dtype="float16")

NAMES = sorted(all_methods())

#: knob names, defaults and order are fixed (other code and measurement runs use them)
EXPECTED_KNOBS = {
    "none": {},
    "fp8": {"impl": "auto"},
    "kivi": {"bits": 2, "group_size": 32, "residual_length": 128, "impl": "lmdeploy"},
    "gear": {"bits": 4, "rank_ratio": 0.02, "outlier_ratio": 0.02, "impl": "lmdeploy"},
    "h2o": {"budget": 256, "window": 32, "impl": "lmdeploy"},
    "streamingllm": {"sink": 4, "window": 252, "impl": "lmdeploy"},
    "snapkv": {"budget": 256, "window": 32, "kernel_size": 7, "impl": "composed"},
    "pyramidkv": {"budget": 256, "window": 32, "kernel_size": 7, "impl": "composed", "beta": 20},
    "h2o_kivi": {"budget": 256, "window": 32, "bits": 4, "group_size": 32, "residual_length": 128, "impl": "composed"},
}

#: (paged, prefill path, shares prefix) of the default implementations, as documented in docs/methods.md
EXPECTED_LAYOUT = {
    "none": (True, "flash", True),
    "fp8": (True, "flash", True),
    "kivi": (True, "flash", False),
    "gear": (True, "flash", False),
    "h2o": (True, "flash", False),
    "streamingllm": (True, "flash", False),
    "snapkv": (True, "flash", False),
    "pyramidkv": (True, "flash", False),
    "h2o_kivi": (True, "flash", False),
}
#: the same for the first-principles reference implementations, where the layout differs
REFERENCE_LAYOUT = {
    "kivi:impl=reference": (False, "flash", False),
    "gear:impl=reference": (False, "flash", False),
    "h2o:impl=reference": (False, "eager", False),
    "streamingllm:impl=sliding": (True, "flash", False),
    "h2o_kivi:impl=reference": (False, "eager", False),
}

#: default plus non-default settings, for the kept-token contract
CONTRACT_SPECS = [name for name in NAMES] + list(REFERENCE_LAYOUT) + [
    "h2o:budget=64,window=8", "h2o:budget=2,window=1", "streamingllm:sink=0,window=16",
    "streamingllm:sink=4,window=1", "snapkv:budget=40,window=8,kernel_size=1",
    "pyramidkv:budget=100,window=10,kernel_size=5,beta=1", "h2o_kivi:budget=96,window=16,bits=2,group_size=16,residual_length=32",
    "kivi:bits=4,group_size=64,residual_length=64", "h2o:budget=64,window=8,impl=reference",
    "h2o:budget=2,window=1,impl=reference", "streamingllm:sink=0,window=16,impl=sliding",
    "streamingllm:sink=4,window=1,impl=sliding", "snapkv:budget=40,window=8,kernel_size=1,impl=reference",
    "h2o_kivi:budget=96,window=16,bits=2,group_size=16,residual_length=32,impl=reference",
]
PROMPTS = [1, 2, 7, 31, 64, 255, 256, 257, 1000, 3000]


def default(name):
    return all_methods()[name]()


# -- registry, knobs, spec strings -----------------------------------------------------------------------

def test_registry_has_every_method():
    assert set(NAMES) == set(EXPECTED_KNOBS)


@pytest.mark.parametrize("name", NAMES)
def test_knobs_fixed_names_defaults_and_order(name):
    assert list(all_methods()[name].knobs().items()) == list(EXPECTED_KNOBS[name].items())


@pytest.mark.parametrize("name", NAMES)
def test_constructs_with_defaults_and_spec_round_trips(name):
    m = default(name)
    m.validate()
    spec = m.spec_string()
    assert spec.split(":")[0] == name
    again = parse_method(spec)
    assert again == m and type(again) is type(m)
    assert again.spec_string() == spec
    assert parse_method({"name": name, **{k: getattr(m, k) for k in m.knobs()}}) == m
    assert parse_method_list(f"none,{spec},fp8") == [default("none"), m, default("fp8")]


@pytest.mark.parametrize("name", NAMES)
def test_class_metadata(name):
    cls = all_methods()[name]
    m = cls()
    assert cls.paper and cls.runtime_needs and (cls.__doc__ or "").strip()
    assert m.prefill_attention in ("flash", "eager")
    assert (m.paged, m.prefill_attention, m.shares_prefix) == EXPECTED_LAYOUT[name]


@pytest.mark.parametrize("spec", sorted(REFERENCE_LAYOUT))
def test_reference_layouts(spec):
    m = parse_method(spec)
    assert (m.paged, m.prefill_attention, m.shares_prefix) == REFERENCE_LAYOUT[spec]


def test_typed_values_from_yaml_are_coerced_or_refused():
    assert make_method("h2o", budget=512.0, window=32).budget == 512
    assert isinstance(make_method("gear", rank_ratio=0).rank_ratio, float)
    with pytest.raises(ConfigError, match=r"budget=512\.5"):
        make_method("h2o", budget=512.5)
    with pytest.raises(ConfigError, match="budget"):
        make_method("h2o", budget=True)


# -- kept tokens ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_kept_tokens_contract(spec):
    m = parse_method(spec)
    for prompt in PROMPTS:
        # prefill: everything computed so far is held
        for ctx in range(0, prompt):
            assert m.kept_tokens(prompt, ctx) == ctx
        limit = m.kept_limit(prompt)
        prev = m.kept_tokens(prompt, prompt)
        assert 1 <= prev <= prompt
        if limit is not None:
            assert prev <= limit
        for ctx in range(prompt + 1, prompt + 700):
            kept = m.kept_tokens(prompt, ctx)
            assert kept - prev in (0, 1), (prompt, ctx)
            if limit is None or prev < limit:
                assert kept == prev + 1, (prompt, ctx, prev, limit)
            else:
                assert kept == prev
            assert kept <= ctx
            if limit is not None:
                assert kept <= limit
            prev = kept


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_budget_never_exceeded_after_prefill(spec):
    m = parse_method(spec)
    knobs = {k: getattr(m, k) for k in m.knobs()}  # this setting's values (knobs() gives the defaults)
    cap = knobs["budget"] if "budget" in knobs else knobs["sink"] + knobs["window"] if "sink" in knobs else None
    if cap is None:
        return
    block_cut = getattr(m, "impl", None) in ("lmdeploy", "composed") and m.name in ("h2o", "streamingllm", "h2o_kivi")
    for prompt in PROMPTS:
        after_prefill = m.kept_tokens(prompt, prompt)
        if block_cut:  # whole 64-token blocks, the last one partial: never above the budget
            expect = prompt if prompt <= cap else (max(1, cap // 64) - 1) * 64 + (prompt % 64 or 64)
            assert after_prefill == min(prompt, expect) <= min(prompt, max(cap, 64))
        else:
            assert after_prefill == min(prompt, cap)
        if m.kept_limit(prompt) is None:  # compress-once: the prompt part never exceeds the budget
            assert m.kept_tokens(prompt, prompt + 500) == after_prefill + 500
        else:
            assert m.kept_limit(prompt) == cap
            assert max(m.kept_tokens(prompt, c) for c in range(prompt, prompt + 2 * cap)) <= cap


def test_kept_counts_by_hand():
    # LMDeploy's cut: budget 256 = 4 blocks of 64, the last one partial (5000 = 78 x 64 + 8): 3 x 64 + 8,
    # then every generated token appended
    assert default("h2o").kept_tokens(5000, 6000) == 3 * 64 + 8 + 1000
    assert default("h2o").kept_tokens(5056, 5057) == 256 + 1
    assert default("streamingllm").kept_tokens(5000, 6000) == 3 * 64 + 8 + 1000
    assert parse_method("h2o:impl=reference").kept_tokens(5000, 6000) == 256
    assert default("h2o").kept_tokens(100, 150) == 150
    assert parse_method("streamingllm:impl=sliding").kept_tokens(5000, 6000) == 256
    assert default("snapkv").kept_tokens(1000, 1100) == 356
    assert default("snapkv").kept_tokens(100, 150) == 150
    assert default("pyramidkv").kept_tokens(1000, 1100) == 356
    assert default("kivi").kept_tokens(1000, 1100) == 1100
    assert parse_method("h2o_kivi:impl=reference").kept_limit(10) == 256
    assert default("h2o_kivi").kept_limit(10) is None


def test_pyramidkv_layer_budgets_follow_the_reference():
    m = default("pyramidkv")
    assert m.layer_budgets(32, 100) == [100] * 32  # below the budget: no compression
    assert m.layer_budgets(32, 300) == [256] * 32  # below 2 (budget - window): SnapKV's uniform budget
    b = m.layer_budgets(32, 4096)
    assert b[0] == 2 * 224 - 224 // 20 + 32 and b == sorted(b, reverse=True) and len(b) == 32
    # the reference's integer step leaves its average ((max - min) mod (L - 1)) / 2 above the budget
    assert sum(b) / 32 == 256 + (426 % 31) / 2
    for L in (2, 16, 40, 80):
        for prompt in (448, 460, 469, 470, 2000):
            bl = m.layer_budgets(L, prompt)
            assert 256 <= sum(bl) / L <= 256 + (L - 2) / 2 + 1e-9
            assert min(bl) >= 32 and max(bl) <= prompt


# -- memory ---------------------------------------------------------------------------------------------

def test_bytes_per_token_hand_counts_llama8b():
    # 32 layers x 8 KV heads x 128 dims x (K and V) = 65,536 elements per token
    assert default("none").bytes_per_token(LLAMA8B) == 131072  # x 2 B
    assert default("fp8").bytes_per_token(LLAMA8B) == 65536  # x 1 B
    # KIVI-2, G=32: per layer and head, K and V codes 2 x 128 x 2/8 = 64 B, key scales/zeros 128 x 4 B / 32 = 16 B,
    # value scales/zeros 128/32 groups x 4 B = 16 B: 96 B x 8 heads x 32 layers
    kivi = parse_method("kivi:impl=reference")
    assert kivi.bytes_per_token(LLAMA8B) == 96 * 8 * 32 == 24576
    assert make_method("kivi", bits=4, impl="reference").bytes_per_token(LLAMA8B) == 160 * 8 * 32 == 40960
    # residual tail: 128 tokens x (131072 - 24576) B
    assert kivi.extra_bytes_per_seq(LLAMA8B) == 128 * (131072 - 24576)
    # LMDeploy's per-token blocks: per layer and KV head, K and V each 128 x bits/8 B of codes + fp16 scale
    # and zero (4 B): 2 x (32 + 4) = 72 B at 2 bits, 2 x (64 + 4) = 136 B at 4; one 64-token fp16 block
    assert default("kivi").bytes_per_token(LLAMA8B) == 72 * 8 * 32 == 18432
    assert make_method("kivi", bits=4).bytes_per_token(LLAMA8B) == 136 * 8 * 32 == 34816
    assert default("kivi").extra_bytes_per_seq(LLAMA8B) == 64 * (131072 - 18432)
    assert default("gear").bytes_per_token(LLAMA8B) == 34816 and default("gear").extra_bytes_per_seq(LLAMA8B) == 0
    # GEAR-4: codes 65536 x 4/8 + scales 65536 x 4 B / 64 + outliers 2% x 65536 x (2 + 4) B
    #         + low rank r = int(0.02 x 128) = 2: 2 x 32 x 8 x 2 x 2 B x (1 + 128/64)
    gear = 32768 + 4096 + 0.02 * 65536 * 6 + 2 * 32 * 8 * 2 * 2 * 3
    gear_ref = parse_method("gear:impl=reference")
    assert gear_ref.bytes_per_token(LLAMA8B) == pytest.approx(gear) == pytest.approx(50872.32)
    assert gear_ref.extra_bytes_per_seq(LLAMA8B) == pytest.approx(64 * (131072 - gear))
    for name in ("h2o", "streamingllm", "snapkv", "pyramidkv"):
        assert default(name).bytes_per_token(LLAMA8B) == 131072
        assert default(name).extra_bytes_per_seq(LLAMA8B) == 0
    hk = parse_method("h2o_kivi:impl=reference")
    assert hk.bytes_per_token(LLAMA8B) == 40960
    assert hk.extra_bytes_per_seq(LLAMA8B) == 128 * (131072 - 40960)
    assert make_method("h2o_kivi", budget=64, residual_length=128, impl="reference").extra_bytes_per_seq(LLAMA8B) == 64 * (131072 - 40960)
    assert default("h2o_kivi").bytes_per_token(LLAMA8B) == 34816


def test_kivi2_cuts_bytes_by_16_over_2_minus_metadata():
    ratio = default("none").bytes_per_token(LLAMA8B) / parse_method("kivi:impl=reference").bytes_per_token(LLAMA8B)
    assert ratio == pytest.approx(16 / (2 + 1))  # 2 bits of code + 1 bit of scale/zero per element at G=32
    assert 5 < ratio < 8
    coarse = make_method("kivi", group_size=128, residual_length=128, impl="reference")
    assert default("none").bytes_per_token(LLAMA8B) / coarse.bytes_per_token(LLAMA8B) == pytest.approx(16 / 2.25)


def test_kivi_value_groups_round_up():
    # head_dim 80, G=32: key scales 80 x 4 / 32 = 10 B, value scales ceil(80/32) = 3 groups x 4 B = 12 B (fp16)
    per_layer_head = 2 * 80 * 2 / 8 + 10 + 12
    assert parse_method("kivi:impl=reference").bytes_per_token(ODD) == pytest.approx(3 * 6 * per_layer_head)


@pytest.mark.parametrize("name", NAMES)
def test_memory_positive_and_split_by_tensor_parallelism(name):
    m = default(name)
    b1, b2 = m.bytes_per_token(LLAMA8B, 1), m.bytes_per_token(LLAMA8B, 2)
    assert 0 < b1 <= default("none").bytes_per_token(LLAMA8B)
    assert b2 == pytest.approx(b1 / 2)
    assert m.extra_bytes_per_seq(LLAMA8B, 2) == pytest.approx(m.extra_bytes_per_seq(LLAMA8B, 1) / 2)
    assert m.extra_bytes_per_seq(LLAMA8B) >= 0
    # more TP ranks than KV heads: each GPU still holds one head
    assert m.bytes_per_token(LLAMA8B, 16) == pytest.approx(b1 / 8)


# -- work ----------------------------------------------------------------------------------------------

def _check(w):
    assert isinstance(w, Work)
    for f in ("flops", "bytes", "alu_ops", "host_s"):
        v = getattr(w, f)
        assert v >= 0 and math.isfinite(v)
    return w


def _mono(works, fields=("flops", "bytes", "alu_ops", "host_s")):
    for a, b in zip(works, works[1:]):
        for f in fields:
            assert getattr(b, f) >= getattr(a, f) - 1e-6


@pytest.mark.parametrize("spec", NAMES + sorted(REFERENCE_LAYOUT))
@pytest.mark.parametrize("tp", [1, 2])
def test_work_non_negative_and_monotone(spec, tp):
    m = parse_method(spec)
    for fn in (m.decode_attention_work, m.decode_extra_work):
        for seqs in (1, 4, 64):
            _mono([_check(fn(LLAMA8B, tp, seqs, seqs * k)) for k in (0, 1, 16, 255, 256, 257, 4096)])
        # at a fixed kept sum more sequences hold more of it in their full-precision recent blocks, so
        # the dequantising part may shrink; the traffic does not
        _mono([_check(fn(LLAMA8B, tp, s, 4096)) for s in (1, 2, 8, 64)], ("flops", "bytes"))
    for last in (False, True):
        for q in (1, 16, 512):
            _mono([_check(m.prefill_attention_work(LLAMA8B, tp, q, kv)) for kv in (q, q + 1, q + 255, 4096, 32768)])
            extra = [_check(m.prefill_extra_work(LLAMA8B, tp, q, kv, last)) for kv in (q, q + 1, q + 255, 4096, 32768)]
            if m.name != "streamingllm":  # its post-prefill copy follows the prompt's partial last block
                _mono(extra)
        _mono([_check(m.prefill_attention_work(LLAMA8B, tp, q, 8192)) for q in (1, 2, 64, 1024, 8192)])
        _mono([_check(m.prefill_extra_work(LLAMA8B, tp, q, 8192, last)) for q in (1, 2, 64, 1024, 8192)])
        _check(m.prefill_call_work(LLAMA8B, tp, [(q, 8192, last)]))


def test_h2o_eager_prefill_adds_the_quadratic_score_traffic():
    none, h2o = default("none"), parse_method("h2o:impl=reference")
    diffs = []
    for n in (4096, 8192):
        w_none, w_h2o = none.prefill_attention_work(LLAMA8B, 1, n, n), h2o.prefill_attention_work(LLAMA8B, 1, n, n)
        assert w_h2o.bytes > 2 * w_none.bytes and w_h2o.flops == w_none.flops
        diffs.append(w_h2o.bytes - w_none.bytes)
    assert diffs[1] / diffs[0] == pytest.approx(4.0)  # O(n^2)
    assert default("snapkv").prefill_attention_work(LLAMA8B, 1, 4096, 4096) == none.prefill_attention_work(LLAMA8B, 1, 4096, 4096)


def test_decode_reads_follow_the_storage_format():
    none = default("none").decode_attention_work(LLAMA8B, 1, 8, 8 * 4096)
    fp8 = default("fp8").decode_attention_work(LLAMA8B, 1, 8, 8 * 4096)
    kivi = parse_method("kivi:impl=reference").decode_attention_work(LLAMA8B, 1, 8, 8 * 4096)
    assert fp8.bytes == pytest.approx((none.bytes + 8 * 2 * 32 * 128 * 2) / 2, rel=1e-3)
    assert kivi.bytes < fp8.bytes < none.bytes
    assert kivi.flops > fp8.flops > none.flops  # dequantization in the kernel


def test_method_specific_extra_work():
    for name in ("none", "h2o", "streamingllm", "snapkv", "pyramidkv"):
        assert default(name).decode_extra_work(LLAMA8B, 1, 8, 8 * 1000) == Work()
    h2o = parse_method("h2o:impl=reference")
    w1, w2 = h2o.decode_extra_work(LLAMA8B, 1, 8, 1000), h2o.decode_extra_work(LLAMA8B, 1, 8, 2000)
    assert w2.bytes == pytest.approx(2 * w1.bytes) and w1.bytes > 0  # linear in kept tokens
    # SnapKV compresses once, on the last chunk, and only prompts longer than the budget
    for snap in (default("snapkv"), parse_method("snapkv:impl=reference")):
        assert snap.prefill_extra_work(LLAMA8B, 1, 512, 4096, False) == Work()
        assert snap.prefill_extra_work(LLAMA8B, 1, 200, 200, True) == Work()
        assert snap.prefill_extra_work(LLAMA8B, 1, 512, 4096, True).flops > 0
    # quantizers pay per new token
    for name in ("fp8", "kivi", "gear"):
        m = default(name)
        assert m.decode_extra_work(LLAMA8B, 1, 8, 0).bytes == pytest.approx(8 * m.decode_extra_work(LLAMA8B, 1, 1, 0).bytes)
        assert m.prefill_extra_work(LLAMA8B, 1, 100, 100, False).bytes > 0


# -- validation ----------------------------------------------------------------------------------------

BAD = [
    ("kivi:bits=3", "bits", "3", "supported"),
    ("kivi:group_size=0", "group_size", "0", "positive"),
    ("kivi:residual_length=-128", "residual_length", "-128", "positive"),
    ("kivi:residual_length=100", "residual_length", "100", "multiple of group_size=32"),
    ("gear:bits=5,impl=reference", "bits", "5", "supported"),
    ("gear:bits=2", "bits", "2", "impl=lmdeploy is LMDeploy's int4 cache"),
    ("kivi:impl=hf", "impl", "'hf'", "supported: lmdeploy, reference"),
    ("fp8:impl=fast", "impl", "'fast'", "supported: auto, native, software, triton"),
    ("gear:rank_ratio=1.0", "rank_ratio", "1.0", "[0, 1)"),
    ("gear:outlier_ratio=-0.1", "outlier_ratio", "-0.1", "[0, 1)"),
    ("h2o:budget=32", "budget", "32", "budget below the window"),
    ("h2o:budget=16,window=32", "budget", "16", "budget below the window"),
    ("h2o:window=0", "window", "0", "positive"),
    ("streamingllm:window=0", "window", "0", "positive"),
    ("streamingllm:sink=-1", "sink", "-1", "at least 0"),
    ("snapkv:kernel_size=0", "kernel_size", "0", "positive"),
    ("snapkv:budget=10", "budget", "10", "budget below the window"),
    ("pyramidkv:beta=0", "beta", "0", "positive"),
    ("pyramidkv:budget=32", "budget", "32", "budget below the window"),
    ("h2o_kivi:bits=8", "bits", "8", "supported"),
    ("h2o_kivi:budget=32", "budget", "32", "budget below the window"),
    ("h2o_kivi:residual_length=48", "residual_length", "48", "multiple of group_size"),
]


@pytest.mark.parametrize("spec,knob,value,why", BAD)
def test_bad_knob_values_name_knob_and_value(spec, knob, value, why):
    with pytest.raises(ConfigError) as e:
        parse_method(spec)
    msg = str(e.value)
    assert spec.split(":")[0] in msg and f"{knob}={value}" in msg and why in msg, msg


def test_unknown_knob_and_bad_type():
    with pytest.raises(ConfigError, match=r"unknown knob 'bogus'.*bits, group_size, impl, residual_length"):
        parse_method("kivi:bogus=1")
    with pytest.raises(ConfigError, match=r"budget='abc' is not a valid int"):
        parse_method("h2o:budget=abc")
    with pytest.raises(ConfigError, match="unknown knob"):
        parse_method("fp8:bits=8")
    with pytest.raises(ConfigError, match="unknown knob"):
        parse_method("none:impl=lmdeploy")


# -- output length -----------------------------------------------------------------------------------

PUBLISHED = {"kivi": (0.028, 0.449), "gear": (0.008, 0.494), "h2o": (0.110, 0.143), "streamingllm": (0.173, 0.163)}


@pytest.mark.parametrize("name", NAMES)
def test_default_length_ratio_is_documented(name):
    r = default(name).default_length_ratio()
    assert isinstance(r, LengthRatio) and r.source and r.mean_ratio > 0 and r.sigma >= 0 and not r.samples
    if name in PUBLISHED:
        assert "Gao et al., MLSys 2025" in r.source and "Table 9" in r.source and "fitted" in r.source
        halved, longer = PUBLISHED[name]
        assert r.share_below(0.5) == pytest.approx(halved, abs=1e-9)
        assert 1 - r.share_below(1.5) == pytest.approx(longer, abs=1e-9)
    elif name != "none":
        assert "no published figure found" in r.source and "kvprof lengths measures it" in r.source
        assert (r.mean_ratio, r.sigma) == (1.0, 0.0)


def test_length_ratio_convention_is_the_arithmetic_mean():
    r = length_ratio_from_tail_shares(0.1, 0.2, "test")
    assert r.log_mu == pytest.approx(math.log(r.mean_ratio) - r.sigma ** 2 / 2)
    assert r.share_below(math.exp(r.log_mu)) == pytest.approx(0.5)  # the median is exp(log_mu)
    assert default("kivi").default_length_ratio().mean_ratio == pytest.approx(1.6185, abs=1e-3)


# -- listing -------------------------------------------------------------------------------------------

def test_format_methods_lists_every_method():
    text = format_methods()
    for name, cls in all_methods().items():
        assert f"\n{name}\n" in f"\n{text}"
        assert cls().spec_string() in text
        assert cls.paper in text
        for knob in cls.knobs():
            assert f"{knob}=" in text
        for impl in cls.IMPLEMENTATIONS.values():
            assert f"impl={impl.name}" in text and impl.basis in text
    assert "contiguous per request" in text and "eager" in text
    assert "measured" in text and "composed" in text and "first principles" in text
