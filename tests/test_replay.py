"""kvprof replay on the CPU: the tiny Llama through the paged caches equals a plain contiguous-cache
forward; chunking and preemption by recompute change nothing; every request generates exactly its
output length; the methods run and keep exactly what they should; the CLI writes a measured case."""

from __future__ import annotations

import csv
import json
import math

import pytest

torch = pytest.importorskip("torch")

from kvsim.config import EngineConfig, config_from_mapping  # noqa: E402
from kvsim.methods import parse_method  # noqa: E402
from kvsim.metrics.collector import REQUEST_COLUMNS  # noqa: E402
from kvsim.workload.readers import read_trace  # noqa: E402
from kvsim.workload.request import Request  # noqa: E402
from profiler.kernels import ops  # noqa: E402
from profiler.replay.engine import STEP_COLUMNS, ReplayEngine, prompt_ids  # noqa: E402
from profiler.methods import parse as parse_for, support  # noqa: E402
from profiler.replay.kvstore import Item, SeqKV, length_buckets, token_groups  # noqa: E402
from profiler.replay.model import Llama, load_config  # noqa: E402

CFG, SPEC = load_config(None, tiny=True)
BS = 4  # small blocks: many pages per sequence


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds contention
    yield Llama(CFG, "cpu", torch.float32, seed=0)
    torch.set_num_threads(threads)


def make_store(method: str, num_blocks=512, max_num_seqs=8, block_size=BS, max_attn_tokens=None, backend="ops"):
    m = parse_for(method, "replay")
    kw = {"max_attn_tokens": max_attn_tokens} if max_attn_tokens else {}
    return support(m.name).store(CFG, m, num_blocks, block_size, "cpu", torch.float32, max_num_seqs, backend, **kw), m


def reference_greedy(model, prompt: list[int], n_out: int, eager=False):
    """Logits of the last prompt position and of every decode step, over a contiguous cache."""
    logits, past = model.reference_forward(torch.tensor(prompt), eager=eager)
    out = [logits[-1]]
    toks = [int(logits[-1].argmax())]
    for _ in range(n_out - 1):
        lg, past = model.reference_forward(torch.tensor([toks[-1]]), past, eager=eager)
        out.append(lg[-1])
        toks.append(int(lg[-1].argmax()))
    return torch.stack(out), toks, past


def reference_forced(model, prompt: list[int], toks: list[int], eager=False):
    """Contiguous-cache logits at every sampling position for the given continuation (teacher forcing)."""
    seq = list(prompt) + list(toks[:-1])
    logits, _ = model.reference_forward(torch.tensor(seq), eager=eager)
    return logits[len(prompt) - 1:]


def drive(model, store, seqs, chunk=None, n_out=6):
    """Run several sequences through ``store`` in shared steps (prefill chunks of ``chunk`` tokens, then
    decodes), mixing prefills and decodes when lengths differ. Returns per sequence the logits of every
    sampling step and the sampled tokens."""
    states = [SeqKV(list(p)) for p in seqs]
    for st, p in zip(states, seqs):
        store.ensure(st, -(-(len(p) + n_out) // BS) + 8)
    plen = [len(p) for p in seqs]
    comp = [0] * len(seqs)
    logits = [[] for _ in seqs]
    while any(len(st.tokens) - plen[i] < n_out for i, st in enumerate(states)):
        items, toks, pos, rows, who = [], [], [], [], []
        row = 0
        order = sorted(range(len(seqs)), key=lambda i: comp[i] >= plen[i])  # prefills first
        for i in order:
            st = states[i]
            if len(st.tokens) - plen[i] >= n_out:
                continue
            c = comp[i]
            if c < plen[i]:
                n = min(chunk or plen[i], plen[i] - c)
                it = Item(st, c, n, row, True, c + n == plen[i])
            else:
                n = 1
                it = Item(st, c, 1, row, False, False)
            items.append(it)
            toks += st.tokens[c:c + n]
            pos += list(range(c, c + n))
            if c + n == len(st.tokens):
                rows.append(row + n - 1)
                who.append(i)
            row += n
            comp[i] = c + n
        store.begin_step(items)
        lg = model.forward(torch.tensor(toks), torch.tensor(pos), store.attend, torch.tensor(rows, dtype=torch.long))
        store.end_step(items)
        for r, i in enumerate(who):
            logits[i].append(lg[r])
            states[i].tokens.append(int(lg[r].argmax()))
    return [torch.stack(x) for x in logits], [st.tokens[plen[i]:] for i, st in enumerate(states)], states


PROMPTS = [prompt_ids(1, i, n, CFG.vocab_size) for i, n in enumerate((37, 9, 22))]


# ------------------------------------------------------------------------------------------------
# the paged forward equals the contiguous one
@pytest.mark.parametrize("chunk", [None, 5])
def test_paged_cache_equals_contiguous_forward(model, chunk):
    store, _ = make_store("none")
    lg, toks, _ = drive(model, store, PROMPTS, chunk=chunk)
    for p, l, t in zip(PROMPTS, lg, toks):
        ref_l, ref_t, _ = reference_greedy(model, p, len(t))
        assert torch.allclose(l, ref_l, atol=1e-4, rtol=1e-4), (l - ref_l).abs().max()
        assert t == ref_t


def test_chunked_prefill_equals_unchunked(model):
    a, ta, _ = drive(model, make_store("none")[0], PROMPTS, chunk=None)
    b, tb, _ = drive(model, make_store("none")[0], PROMPTS, chunk=3)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    assert ta == tb


def test_length_buckets_bound_padding_and_tokens():
    lens = [100, 90, 61, 59, 30, 5, 5, 1]
    b = length_buckets(lens, ratio=0.6)
    assert sorted(i for g in b for i in g) == list(range(len(lens)))
    for g in b:
        assert min(lens[i] for i in g) >= 0.6 * max(lens[i] for i in g) or len(g) == 1
    cut = length_buckets([50] * 10, max_tokens=120)
    assert [len(g) for g in cut] == [2, 2, 2, 2, 2]
    assert token_groups([50, 50, 50], 100) == [[0, 1], [2]]


# ------------------------------------------------------------------------------------------------
# the methods keep what they should and change what is attended once the budget is exceeded
def test_fp8_close_to_full_cache(model):
    lg, toks, _ = drive(model, make_store("fp8")[0], PROMPTS[:1])
    ref = reference_forced(model, PROMPTS[0], toks[0])
    err = (lg[0] - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item()


def test_streamingllm_keeps_sinks_and_window(model):
    prompt = PROMPTS[0]  # 37 tokens > sink + window
    store, m = make_store("streamingllm:sink=2,window=14")
    lg, toks, states = drive(model, store, [prompt], n_out=9)
    st = states[0]
    assert st.kv_len == m.sink + m.window
    # layer 0's cached keys (they depend on token and position only) are exactly the reference keys of
    # the sinks and of the last `window` positions
    _, past = model.reference_forward(torch.tensor(list(prompt) + toks[0][:-1]))
    ctx = len(prompt) + 8  # positions whose KV is cached (the last sampled token's is not)
    keep = list(range(m.sink)) + list(range(ctx - m.window, ctx))
    flat = torch.tensor([st.pages[s // BS] * BS + s % BS for s in range(st.kv_len)])
    cached = store.k[0].flatten(0, 1)[flat]  # [kept, Hkv, D], ring order
    ref = past[0][0][0].transpose(0, 1)[keep]
    d = torch.cdist(cached.flatten(1), ref.flatten(1))
    assert d.min(dim=1).values.max() < 1e-4 and d.min(dim=0).values.max() < 1e-4
    ref_l = reference_forced(model, prompt, toks[0])
    assert not torch.allclose(lg[0], ref_l, atol=1e-3)


def test_streamingllm_equals_full_cache_until_the_window_fills(model):
    prompt = PROMPTS[1]  # 9 tokens
    store, m = make_store("streamingllm:sink=2,window=12")  # keeps 14
    lg, toks, _ = drive(model, store, [prompt], n_out=9)
    ref = reference_forced(model, prompt, toks[0])
    # the query at position p attends p + 1 tokens: identical while p + 1 <= 14
    same = 14 - len(prompt) + 1
    assert torch.allclose(lg[0][:same], ref[:same], atol=1e-4)
    assert not torch.allclose(lg[0][same:], ref[same:], atol=1e-3)


def test_h2o_keeps_budget_window_and_heavy_hitters(model):
    prompt = PROMPTS[0]
    store, m = make_store("h2o:budget=16,window=4")
    lg, toks, states = drive(model, store, [prompt], n_out=8)
    st = states[0]
    assert st.kv_len == m.budget
    ctx = len(prompt) + 7
    flat = torch.tensor([st.pages[s // BS] * BS + s % BS for s in range(st.kv_len)])
    for li in range(CFG.num_layers):
        pos = store.pos[li][flat]  # [budget, Hkv]
        for h in range(CFG.num_kv_heads):
            held = set(pos[:, h].tolist())
            assert len(held) == m.budget
            assert set(range(ctx - m.window, ctx)) <= held  # the recent window is always kept
    ref = reference_forced(model, prompt, toks[0], eager=True)
    assert torch.allclose(lg[0][0], ref[0], atol=1e-4)  # prefill attends the whole prompt
    assert not torch.allclose(lg[0][1:], ref[1:], atol=1e-3)


def test_h2o_prefill_selection_matches_reference_scores(model):
    """Layer 0 after prefill keeps exactly h2o_keep_indices of the accumulated prompt attention."""
    prompt = PROMPTS[0]
    store, m = make_store("h2o:budget=16,window=4")
    _, _, states = drive(model, store, [prompt], n_out=1)
    st = states[0]
    # recompute layer 0's probabilities independently
    x = model.embed[torch.tensor(prompt)]
    L0 = model.layers[0]
    T = len(prompt)
    h = ops.rms_norm(x, L0["ln1"], CFG.rms_norm_eps)
    q, k, _ = ops.linear(h, L0["wqkv"]).split((CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim,
                                               CFG.num_kv_heads * CFG.head_dim), dim=-1)
    cos, sin = model.rope(torch.arange(T))
    q = ops.rotary(q.view(T, CFG.num_heads, CFG.head_dim), cos, sin).transpose(0, 1)[None]
    k = ops.rotary(k.view(T, CFG.num_kv_heads, CFG.head_dim), cos, sin).transpose(0, 1)[None]
    _, probs = ops.eager_attention(q, k, k, ops.causal_mask(T, T))
    score = torch.zeros(1, CFG.num_kv_heads, T)
    ops.h2o_accumulate(score, probs)
    want = ops.h2o_keep_indices(score, m.budget, m.window)[0]  # [Hkv, budget]
    flat = torch.tensor([st.pages[s // BS] * BS + s % BS for s in range(m.budget)])
    got = store.pos[0][flat].t()  # [Hkv, budget]
    for hh in range(CFG.num_kv_heads):
        assert sorted(got[hh].tolist()) == sorted(want[hh].tolist())


def test_snapkv_compresses_prompt_then_appends(model):
    prompt = PROMPTS[0]
    store, m = make_store("snapkv:budget=16,window=4,kernel_size=3")
    lg, toks, states = drive(model, store, [prompt], chunk=10, n_out=6)
    assert states[0].kv_len == m.budget + 5
    ref = reference_forced(model, prompt, toks[0])
    assert torch.allclose(lg[0][0], ref[0], atol=1e-4)  # the prompt's own logits use the full prompt
    assert not torch.allclose(lg[0][1:], ref[1:], atol=1e-3)


def test_kivi_quantizes_all_but_the_residual(model):
    prompt = PROMPTS[0]  # 37 tokens
    store, m = make_store("kivi:bits=2,group_size=32,residual_length=32")
    lg, toks, states = drive(model, store, [prompt], n_out=30)
    st = states[0]
    assert st.n_q + st.n_res == len(prompt) + 29
    assert st.n_q == 64 and st.n_res == len(prompt) + 29 - 64
    ref = reference_forced(model, prompt, toks[0])
    assert torch.allclose(lg[0][0], ref[0], atol=1e-4)  # prefill attends the fresh full-precision chunk
    err = (lg[0][1:] - ref[1:]).abs().max().item()
    assert 0 < err


def test_kivi_batched_decode_matches_single(model):
    """Bucketed, masked KIVI decode of several sequences equals running each alone."""
    together, _, _ = drive(model, make_store("kivi:bits=4,group_size=32,residual_length=32")[0], PROMPTS, n_out=12)
    for i, p in enumerate(PROMPTS):
        alone, _, _ = drive(model, make_store("kivi:bits=4,group_size=32,residual_length=32")[0], [p], n_out=12)
        assert torch.allclose(together[i], alone[0], atol=1e-4)


@pytest.mark.parametrize("method", ["none", "fp8", "h2o:budget=16,window=4", "streamingllm:sink=2,window=14",
                                    "snapkv:budget=16,window=4", "kivi:bits=2,group_size=32,residual_length=32"])
def test_batched_equals_alone(model, method):
    """Every method: sequences batched together (mixed prefill/decode, padded buckets, split calls)
    give the same logits as each sequence alone."""
    together, _, _ = drive(model, make_store(method, max_attn_tokens=40)[0], PROMPTS, chunk=7, n_out=6)
    for i, p in enumerate(PROMPTS):
        alone, _, _ = drive(model, make_store(method)[0], [p], chunk=7, n_out=6)
        assert torch.allclose(together[i], alone[0], atol=1e-4), method


def _varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                   block_table=None, **kw):
    """A CPU stand-in for FlashAttention varlen (``varlen_attn`` has no CPU kernel): same arguments, per
    sequence SDPA, bottom-right causal; reads the pool through the block table in paged mode."""
    assert window_size == (-1, 0) and enable_gqa
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        if block_table is not None:
            n = int(seqused_k[i])
            assert n == int(cu_k[i + 1]) - int(cu_k[i])
            pages = block_table[i, :-(-n // k.shape[1])].long()
            kk, vv = k[pages].flatten(0, 1)[:n], v[pages].flatten(0, 1)[:n]
        else:
            kk, vv = k[int(cu_k[i]):int(cu_k[i + 1])], v[int(cu_k[i]):int(cu_k[i + 1])]
        t = lambda x: x.transpose(0, 1)[None]  # noqa: E731
        out[a:b] = ops.sdpa_prefill(t(q[a:b]), t(kk), t(vv))[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("method,paged", [("none", True), ("none", False), ("fp8", False),
                                          ("streamingllm:sink=2,window=14", True), ("snapkv:budget=16,window=4", False)])
def test_varlen_backend_planning_equals_ops(model, monkeypatch, method, paged):
    """The varlen backend's batch planning (packed rows, cu_seqlens, block tables or gathered tokens)
    gives the ops backend's logits, with a CPU stand-in for the FlashAttention kernel."""
    import torch.nn.attention.varlen as vl

    monkeypatch.setattr(vl, "varlen_attn", _varlen_on_cpu)
    store, _ = make_store(method, backend="varlen", max_attn_tokens=None if paged else 50)
    store.varlen_paged = paged
    got, _, _ = drive(model, store, PROMPTS, chunk=7, n_out=8)
    want, _, _ = drive(model, make_store(method)[0], PROMPTS, chunk=7, n_out=8)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the engine: kvsim's scheduler driving the real forward pass
def trace(n=6, seed=3, gap=0.02):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(8, 60, (1,), generator=g))
        o = int(torch.randint(3, 14, (1,), generator=g))
        out.append(Request(f"r{i}", i * gap, p, o))
    return out


def run_engine(model, reqs, method="none", num_blocks=512, mnbt=64, mns=8, chunked=True):
    m = parse_for(method, "replay")
    cfg = EngineConfig(max_num_seqs=mns, max_num_batched_tokens=mnbt, max_model_len=4096, block_size=BS,
                       enable_chunked_prefill=chunked, enable_prefix_caching=False)
    store = support(m.name).store(CFG, m, num_blocks, BS, "cpu", torch.float32, mns, "ops")
    eng = ReplayEngine(model, SPEC, m, cfg, num_blocks, store, seed=1)
    eng.run(reqs)
    return eng


@pytest.fixture(scope="module")
def base_run(model):
    return run_engine(model, trace(), "none")


def tokens_of(eng):
    return {rid: list(i.generated) for rid, i in eng.info.items()}


def test_engine_generates_exact_lengths_and_reference_tokens(model):
    reqs = trace(gap=0.0)  # all at once: chunked prompts share steps with decodes
    eng = run_engine(model, reqs, mnbt=32)  # chunked prefill and mixed steps
    rows = {r["request_id"]: r for r in eng.rec.rows}
    for r in reqs:
        assert rows[r.request_id]["status"] == "completed"
        assert rows[r.request_id]["output_tokens"] == r.output_tokens
        assert len(eng.info[r.request_id].generated) == r.output_tokens
        ids = prompt_ids(1, eng.info[r.request_id].index, r.prompt_tokens, CFG.vocab_size)
        _, ref_toks, _ = reference_greedy(model, ids, r.output_tokens)
        assert eng.info[r.request_id].generated == ref_toks
    assert any(len(s.prefill_chunks) and s.num_decode_seqs for s in eng.steps)  # mixed steps happened
    assert any(c[2] == 0 for s in eng.steps for c in s.prefill_chunks)  # a prompt was chunked


def test_engine_chunked_equals_unchunked_and_preemption_recomputes(model):
    reqs = trace(gap=0.0)
    base = run_engine(model, reqs, mnbt=256)
    chunked = run_engine(model, reqs, mnbt=16)
    tight = run_engine(model, reqs, mnbt=32, num_blocks=24)  # 96 tokens of KV: preemption by recompute
    assert tight.sched.num_preemptions > 0
    assert sum(r["num_preemptions"] for r in tight.rec.rows) == tight.sched.num_preemptions
    assert tokens_of(base) == tokens_of(chunked) == tokens_of(tight)
    assert sum(s.num_preempted for s in tight.steps) == tight.sched.num_preemptions
    assert tight.store.pages.num_free == tight.store.pages.num_pages  # everything given back


@pytest.mark.parametrize("method", ["h2o:budget=16,window=4", "streamingllm:sink=2,window=14", "fp8",
                                    "kivi:bits=2,group_size=32,residual_length=32", "snapkv:budget=16,window=4"])
def test_engine_runs_methods_and_reports_kept_tokens(model, base_run, method):
    reqs = trace()
    eng = run_engine(model, reqs, method)
    base = base_run
    m = parse_for(method, "replay")
    for r in eng.rec.rows:
        assert r["status"] == "completed" and r["output_tokens"] == r["trace_output_tokens"]
    lim = m.kept_limit(10**6)
    dec = [s for s in eng.steps if s.num_decode_seqs]
    if lim is not None:  # evicting methods: no decode query attends more than the limit
        assert all(s.decode_kv_tokens <= lim * s.num_decode_seqs for s in dec)
        assert sum(s.decode_kv_tokens for s in dec) < sum(s.decode_kv_tokens for s in base.steps if s.num_decode_seqs)
    assert tokens_of(eng) != tokens_of(base) or m.name == "fp8"


# ------------------------------------------------------------------------------------------------
# the CLI end to end
def test_cli_writes_a_measured_case(tmp_path):
    from profiler.cli import main

    src = tmp_path / "trace.jsonl"
    with open(src, "w") as f:
        for r in trace(6, seed=5, gap=0.05):
            f.write(json.dumps({"request_id": r.request_id, "arrival_time_s": 10 + r.arrival_time_s,
                                "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}) + "\n")
    out = tmp_path / "case"
    rc = main(["replay", str(src), "--tiny", "--out", str(out), "--quiet", "--max-num-batched-tokens", "48",
               "--block-size", "4", "--num-gpu-blocks-override", "40", "--method", "streamingllm:sink=2,window=14"])
    assert rc == 0
    meas = list(csv.DictReader(open(out / "measured.csv")))
    assert len(meas) == 6
    assert float(meas[0]["arrival_time_s"]) == 0.0
    wl = list(read_trace(out / "workload.jsonl"))
    assert [w.request_id for w in wl] == [m["request_id"] for m in meas]
    assert [w.output_tokens for w in wl] == [int(m["output_tokens"]) for m in meas]
    for m in meas:
        assert float(m["ttft_ms"]) > 0 and float(m["e2el_ms"]) >= float(m["ttft_ms"]) and float(m["queue_ms"]) >= 0
    reqs = list(csv.DictReader(open(out / "requests.csv")))
    assert list(reqs[0]) == REQUEST_COLUMNS and len(reqs) == 6
    steps = list(csv.DictReader(open(out / "steps.csv")))
    assert list(steps[0]) == STEP_COLUMNS
    summ = json.loads((out / "summary.json").read_text())
    busy = sum(float(s["duration_ms"]) for s in steps) / 1e3
    assert math.isclose(busy, summ["busy_s"], rel_tol=1e-3, abs_tol=1e-3)
    assert busy <= summ["wall_s"] + 1e-3
    # steps tile the busy periods: each starts where the previous ended or after an idle gap
    for a, b in zip(steps, steps[1:]):
        assert float(b["start_s"]) >= float(a["end_s"]) - 1e-6
    assert sum(int(s["num_preempted"]) for s in steps) == summ["num_preemptions"]
    import yaml

    run = yaml.safe_load((out / "run.yaml").read_text())
    cfg, extra = config_from_mapping({k: v for k, v in run.items() if k != "case_id"}, source="run.yaml")
    assert cfg.num_gpu_blocks_override is None and extra["num_gpu_blocks"] == 40
    assert cfg.block_size == 4 and cfg.max_num_batched_tokens == 48 and not cfg.enable_prefix_caching
    assert parse_method(extra["method"]).spec_string() == "streamingllm:sink=2,window=14,impl=sliding"
    assert (out / "model_config.json").is_file() and run["model"].endswith("model_config.json")


def test_cli_case_loads_in_kvsim_validate(tmp_path):
    """The case is in the format ``kvsim validate`` reads (the GPU name is the only thing a CPU run lacks)."""
    validate = pytest.importorskip("kvsim.validate")
    import yaml

    from profiler.cli import main

    src = tmp_path / "trace.jsonl"
    with open(src, "w") as f:
        for r in trace(3, seed=7):
            f.write(json.dumps({"request_id": r.request_id, "arrival_time_s": r.arrival_time_s,
                                "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}) + "\n")
    out = tmp_path / "case"
    assert main(["replay", str(src), "--tiny", "--out", str(out), "--quiet", "--method", "h2o:budget=16,window=4"]) == 0
    run = yaml.safe_load((out / "run.yaml").read_text())
    run["hardware"] = "h100"  # stand-in: kvsim has no CPU hardware spec
    (out / "run.yaml").write_text(yaml.safe_dump(run))
    case = validate.load_case(out)
    assert case.method == "h2o:budget=16,window=4,impl=reference" and case.config.block_size == 16
    reqs = validate.case_requests(case)
    assert len(reqs) == 3 and case.steps_csv is not None
