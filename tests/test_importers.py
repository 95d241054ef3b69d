"""``kvprof import {vidur,llmservingsim}``: small slices of the real reference files (copied into
tmp_path inside each test, never into the repo) go in, and each value must land in the right cell,
converted ms/us -> s. Tests that need the reference data skip when ``shared/`` is absent."""

from __future__ import annotations

import csv
import hashlib
import json
import shlex
import shutil
import statistics
from pathlib import Path

import pytest

from profiler.importers import main as import_main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VIDUR = SHARED / "reference" / "vidur"
LSS = SHARED / "reference" / "llmservingsim" / "perf"
IMPORTED = REPO / "kvsim" / "profiles" / "imported"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not present: {path}")
    return path


def copy_rows(src: Path, dst: Path, keep) -> list[dict]:
    """Copy the header and the rows for which keep(row) is true; return the kept rows."""
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = [r for r in reader if keep(r)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return rows


def run(argv, capsys=None) -> int:
    return import_main([str(a) for a in argv])


def cell(table: dict, **at):
    """The stored value at exact axis values."""
    node = table["time_s"]
    for axis, values in table["axes"].items():
        node = node[values.index(at[axis])]
    return node


def close(a, b, rel=1e-5):
    return a == pytest.approx(b, rel=rel)


# ------------------------------------------------------------------------------------------------
# Vidur
# ------------------------------------------------------------------------------------------------

MLP_REL = "profiling/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv"
AR_REL = "profiling/network/a100_dgx/all_reduce.csv"
ATT_REL = "profiling/compute/a40/meta-llama/Llama-2-7b-hf/attention.csv"


@pytest.fixture
def vidur_slice(tmp_path):
    src = need(VIDUR)
    root = tmp_path / "vidur"
    mlp = copy_rows(src / MLP_REL, root / MLP_REL, lambda r: r["num_tokens"] in ("1", "2", "64", "4096"))
    ar = copy_rows(src / AR_REL, root / AR_REL, lambda r: r["size"] in ("2048", "10240", "16777216"))
    att = copy_rows(src / ATT_REL, root / ATT_REL, lambda r: (
        (r["is_prefill"] == "False" and r["batch_size"] in ("1", "8") and r["kv_cache_size"] in ("32", "64", "1024"))
        or (r["is_prefill"] == "True" and r["prefill_chunk_size"] in ("64", "80") and int(r["kv_cache_size"]) <= 96)))
    # the a40 folder needs an mlp.csv too
    copy_rows(src / "profiling/compute/a40/meta-llama/Llama-2-7b-hf/mlp.csv",
              root / "profiling/compute/a40/meta-llama/Llama-2-7b-hf/mlp.csv",
              lambda r: r["num_tokens"] in ("1", "64"))
    return root, mlp, ar, att


def test_vidur_linear_ops_sum_medians_into_tables(vidur_slice, tmp_path):
    root, mlp, _, _ = vidur_slice
    out = tmp_path / "p.json"
    assert run(["vidur", root, "--model", "llama-2-7b", "--hardware", "a100", "--out", out]) == 0
    prof = json.loads(out.read_text())
    assert prof["schema"] == "kvsim-profile" and prof["schema_version"] == 1
    assert (prof["model"], prof["hardware"], prof["tensor_parallel_size"]) == ("llama-2-7b", "a100", 1)
    t = prof["tables"]
    assert t["linear.qkv"]["axes"] == {"num_tokens": [1, 2, 64, 4096]}
    r64 = next(r for r in mlp if r["num_tokens"] == "64" and r["num_tensor_parallel_workers"] == "1")
    med = lambda op: float(r64[f"time_stats.{op}.median"])  # noqa: E731
    assert close(cell(t["linear.qkv"], num_tokens=64), med("attn_pre_proj") * 1e-3)
    assert close(cell(t["linear.o"], num_tokens=64), med("attn_post_proj") * 1e-3)
    assert close(cell(t["linear.mlp"], num_tokens=64), (med("mlp_up_proj") + med("mlp_act") + med("mlp_down_proj")) * 1e-3)
    assert close(cell(t["linear.other"], num_tokens=64),
                 (med("input_layernorm") + med("post_attention_layernorm") + med("attn_rope") + med("add")) * 1e-3)
    assert close(cell(t["step.embedding"], num_tokens=64), med("emb") * 1e-3)
    # 4096 appears twice per TP in the source: the median of the two medians
    dup = [float(r["time_stats.attn_pre_proj.median"]) for r in mlp
           if r["num_tokens"] == "4096" and r["num_tensor_parallel_workers"] == "1"]
    assert len(dup) == 2
    assert close(cell(t["linear.qkv"], num_tokens=4096), sum(dup) / 2 * 1e-3)
    # TP 1: no communication; a100 has no attention.csv: attention left to the roofline
    assert not {"comm.all_reduce", "attention.prefill.flash", "attention.decode.none", "linear.lm_head"} & set(t)
    pv = prof["provenance"]
    assert pv["files"][0]["path"] == MLP_REL
    assert pv["files"][0]["sha256"] == hashlib.sha256((root / MLP_REL).read_bytes()).hexdigest()
    assert "median" in pv["statistic"] and pv["licence"].startswith("MIT")
    assert pv["command"].startswith("kvprof import vidur ")


def test_vidur_tp_rows_and_all_reduce(vidur_slice, tmp_path):
    root, mlp, ar, _ = vidur_slice
    out = tmp_path / "p.json"
    assert run(["vidur", root, "--model", "llama-2-7b", "--hardware", "a100", "--tp", "2", "--out", out]) == 0
    prof = json.loads(out.read_text())
    t = prof["tables"]
    r1 = next(r for r in mlp if r["num_tokens"] == "1" and r["num_tensor_parallel_workers"] == "2")
    assert close(cell(t["linear.qkv"], num_tokens=1), float(r1["time_stats.attn_pre_proj.median"]) * 1e-3)
    ar_t = t["comm.all_reduce"]
    assert ar_t["axes"]["num_bytes"] == [2048, 10240, 16777216]
    want = [float(r["time_stats.all_reduce.median"]) for r in ar
            if r["size"] == "10240" and r["num_workers"] == "2" and r["devices_per_node"] == "2"]
    assert len(want) == 1 and close(cell(ar_t, num_bytes=10240), want[0] * 1e-3)
    # rows of other groups (e.g. 2 workers over 2 nodes, devices_per_node = 1) are not mixed in
    other = [float(r["time_stats.all_reduce.median"]) for r in ar
             if r["size"] == "10240" and r["num_workers"] == "2" and r["devices_per_node"] == "1"]
    assert other and other[0] != want[0]
    assert prof["provenance"]["source_network"] == "a100_dgx"


def test_vidur_attention_axes(vidur_slice, tmp_path):
    root, _, _, att = vidur_slice
    out = tmp_path / "p.json"
    assert run(["vidur", root, "--model", "llama-2-7b", "--hardware", "a40", "--out", out]) == 0
    t = json.loads(out.read_text())["tables"]
    dec = t["attention.decode.none"]
    assert dec["axes"] == {"batch_size": [1, 8], "kv_tokens": [33, 65, 1025]}  # kv_cache_size + 1
    # some (batch, kv) shapes appear twice in the source: the median of their medians
    v = [float(r["time_stats.attn_decode.median"]) for r in att
         if r["is_prefill"] == "False" and r["batch_size"] == "8" and r["kv_cache_size"] == "1024"]
    assert close(cell(dec, batch_size=8, kv_tokens=1025), statistics.median(v) * 1e-3)
    pre = t["attention.prefill.flash"]
    assert pre["axes"]["chunk_tokens"] == [64, 80]
    # kv_tokens = chunk + kv_cache_size; chunk 64 at kv_cache 32 -> kv 96, measured
    v = [float(r["time_stats.attn_prefill.median"]) for r in att
         if r["is_prefill"] == "True" and r["prefill_chunk_size"] == "64" and r["kv_cache_size"] == "32"]
    assert close(cell(pre, chunk_tokens=64, kv_tokens=96), statistics.median(v) * 1e-3)
    # kv below the chunk is impossible: null
    assert cell(pre, chunk_tokens=80, kv_tokens=64) is None
    # chunk 80 is measured at 80, 112, 144, 176; 96 (from chunk 64's row) lies between: interpolated in log-log
    a = cell(pre, chunk_tokens=80, kv_tokens=80)
    b = cell(pre, chunk_tokens=80, kv_tokens=112)
    mid = cell(pre, chunk_tokens=80, kv_tokens=96)
    assert min(a, b) <= mid <= max(a, b)
    # beyond a row's largest measured kv: null, never extrapolated
    assert cell(pre, chunk_tokens=64, kv_tokens=176) is None


def test_vidur_llama31_alias_is_linear_only_and_says_so(vidur_slice, tmp_path):
    root, _, _, _ = vidur_slice
    src = need(VIDUR)
    rel = "profiling/compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv"
    copy_rows(src / rel, root / rel, lambda r: r["num_tokens"] in ("1", "8"))
    out = tmp_path / "p.json"
    assert run(["vidur", root, "--model", "llama-3.1-8b", "--hardware", "a100", "--out", out]) == 0
    prof = json.loads(out.read_text())
    assert prof["model"] == "llama-3.1-8b" and prof["provenance"]["source_model"] == "meta-llama/Meta-Llama-3-8B"
    assert any("shape alias" in n for n in prof["provenance"]["notes"])
    assert not any(k.startswith("attention.") for k in prof["tables"])


# ------------------------------------------------------------------------------------------------
# LLMServingSim
# ------------------------------------------------------------------------------------------------

L31 = "RTX4090/meta-llama/Llama-3.1-8B/bf16"
Q30 = "RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16"


@pytest.fixture
def lss_slice(tmp_path):
    src = need(LSS)
    root = tmp_path / "perf"
    for var in (L31, Q30):
        (root / var).mkdir(parents=True)
        shutil.copyfile(src / var / "meta.yaml", root / var / "meta.yaml")
    d = copy_rows(src / L31 / "tp1/dense.csv", root / L31 / "tp1/dense.csv", lambda r: r["tokens"] in ("1", "16", "2048"))
    p = copy_rows(src / L31 / "tp1/per_sequence.csv", root / L31 / "tp1/per_sequence.csv", lambda r: r["sequences"] in ("1", "64"))
    a = copy_rows(src / L31 / "tp1/attention.csv", root / L31 / "tp1/attention.csv", lambda r: (
        (r["prefill_chunk"] == "0" and r["n_decode"] in ("1", "32") and r["kv_decode"] in ("16", "1024"))
        or (r["n_decode"] == "0" and r["prefill_chunk"] in ("16", "64") and r["kv_prefill"] in ("0", "16", "32", "64"))
        or (r["prefill_chunk"] in ("16", "32") and r["kv_prefill"] in ("0", "16") and r["n_decode"] in ("1", "4")
            and r["kv_decode"] == "16")))
    copy_rows(src / Q30 / "tp1/dense.csv", root / Q30 / "tp1/dense.csv", lambda r: r["tokens"] in ("1", "2", "4"))
    m = copy_rows(src / Q30 / "tp1/moe.csv", root / Q30 / "tp1/moe.csv", lambda r: int(r["tokens"]) <= 4)
    return root, d, p, a, m


def us(rows, **match):
    hit = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert len(hit) == 1, (match, hit)
    return float(hit[0]["time_us"]) * 1e-6


def test_lss_dense_and_per_sequence_mapping(lss_slice, tmp_path):
    root, d, p, _, _ = lss_slice
    out = tmp_path / "p.json"
    assert run(["llmservingsim", root, "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--out", out]) == 0
    prof = json.loads(out.read_text())
    assert (prof["model"], prof["hardware"], prof["dtype"]) == ("llama-3.1-8b", "rtx-4090", "bfloat16")
    t = prof["tables"]
    assert t["linear.qkv"]["axes"] == {"num_tokens": [1, 16, 2048]}
    assert close(cell(t["linear.qkv"], num_tokens=16), us(d, layer="qkv_proj", tokens=16))
    assert close(cell(t["linear.o"], num_tokens=16), us(d, layer="o_proj", tokens=16))
    assert close(cell(t["linear.mlp"], num_tokens=2048), us(d, layer="gate_up_proj", tokens=2048)
                 + us(d, layer="act_fn", tokens=2048) + us(d, layer="down_proj", tokens=2048))
    # layernorm rows are one call (the two calls averaged): two per layer
    assert close(cell(t["linear.other"], num_tokens=1), 2 * us(d, layer="layernorm", tokens=1) + us(d, layer="rotary_emb", tokens=1))
    assert close(cell(t["step.embedding"], num_tokens=1), us(d, layer="embedding", tokens=1))
    assert close(cell(t["step.final_norm"], num_tokens=16), us(d, layer="final_layernorm", tokens=16))
    assert t["linear.lm_head"]["axes"] == {"num_tokens": [1, 64]}
    assert close(cell(t["linear.lm_head"], num_tokens=64), us(p, layer="lm_head", sequences=64))
    assert t["step.sampler"]["axes"] == {"batch_size": [1, 64]}
    assert close(cell(t["step.sampler"], batch_size=1), us(p, layer="sampler", sequences=1))
    assert "comm.all_reduce" not in t and "step_overhead_s" not in prof
    pv = prof["provenance"]
    assert pv["device"] == "NVIDIA GeForce RTX 4090" and pv["vllm"] == "0.19.0"
    assert "mean" in pv["statistic"]


def test_lss_attention_axes(lss_slice, tmp_path):
    root, _, _, a, _ = lss_slice
    out = tmp_path / "p.json"
    assert run(["llmservingsim", root, "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--out", out]) == 0
    t = json.loads(out.read_text())["tables"]
    dec = t["attention.decode.none"]
    assert dec["axes"] == {"batch_size": [1, 32], "kv_tokens": [17, 1025]}
    assert close(cell(dec, batch_size=32, kv_tokens=1025), us(a, prefill_chunk=0, n_decode=32, kv_decode=1024))
    pre = t["attention.prefill.flash"]
    assert pre["axes"]["chunk_tokens"] == [16, 64]
    # kv_tokens = prefill_chunk + kv_prefill
    assert close(cell(pre, chunk_tokens=64, kv_tokens=96), us(a, prefill_chunk=64, kv_prefill=32, n_decode=0))
    assert close(cell(pre, chunk_tokens=16, kv_tokens=16), us(a, prefill_chunk=16, kv_prefill=0, n_decode=0))
    assert cell(pre, chunk_tokens=64, kv_tokens=32) is None          # kv below the chunk
    assert cell(pre, chunk_tokens=16, kv_tokens=128) is None         # past the row's largest history (64)
    # mixed rows (a chunk and decodes in one call) have their own table, history from 0
    mix = t["attention.mixed.flash"]
    assert mix["axes"] == {"chunk_tokens": [16, 32], "history_tokens": [0, 16], "batch_size": [1, 4], "kv_tokens": [17]}
    assert close(cell(mix, chunk_tokens=32, history_tokens=0, batch_size=4, kv_tokens=17),
                 us(a, prefill_chunk=32, kv_prefill=0, n_decode=4, kv_decode=16))
    assert close(cell(mix, chunk_tokens=16, history_tokens=16, batch_size=1, kv_tokens=17),
                 us(a, prefill_chunk=16, kv_prefill=16, n_decode=1, kv_decode=16))
    mixed = us(a, prefill_chunk=16, kv_prefill=16, n_decode=1, kv_decode=16)
    assert mixed not in [v for row in pre["time_s"] for v in row]


def test_lss_moe(lss_slice, tmp_path):
    root, _, _, _, m = lss_slice
    out = tmp_path / "p.json"
    assert run(["llmservingsim", root, "--model", "qwen3-30b-a3b", "--hardware", "rtx-pro-6000", "--out", out]) == 0
    t = json.loads(out.read_text())["tables"]
    assert "linear.mlp" not in t
    raw = t["linear.moe_by_experts"]
    assert raw["axes"] == {"num_tokens": [1, 2, 4], "activated_experts": [8, 16, 32]}
    assert close(cell(raw, num_tokens=4, activated_experts=32), us(m, tokens=4, activated_experts=32))
    assert cell(raw, num_tokens=1, activated_experts=16) is None  # 1 token reaches at most top_k = 8 experts
    moe = t["linear.moe"]
    # 1 token: exactly top_k = 8 experts; 2 tokens: 128 (1 - (120/128)^2) = 15.5 experts, between 8 and 16
    assert close(cell(moe, num_tokens=1), us(m, tokens=1, activated_experts=8))
    e = 128 * (1 - (1 - 8 / 128) ** 2)
    lo, hi = us(m, tokens=2, activated_experts=8), us(m, tokens=2, activated_experts=16)
    assert close(cell(moe, num_tokens=2), lo + (e - 8) / 8 * (hi - lo))


# ------------------------------------------------------------------------------------------------
# errors (no reference data needed)
# ------------------------------------------------------------------------------------------------


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    for source in ("vidur", "llmservingsim"):
        rc = run([source, tmp_path / "nope", "--model", "llama-2-7b", "--hardware", "a100", "--out", tmp_path / "p.json"])
        err = capsys.readouterr().err
        assert rc == 2 and "does not exist" in err and "nope" in err
    assert not (tmp_path / "p.json").exists()


def test_wrong_layout_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "x.csv").write_text("a,b\n1,2\n")
    rc = run(["vidur", tmp_path / "random", "--model", "llama-2-7b", "--hardware", "a100", "--out", tmp_path / "p.json"])
    assert rc == 2 and "does not look like Vidur" in capsys.readouterr().err
    rc = run(["llmservingsim", tmp_path / "random", "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--out", tmp_path / "p.json"])
    assert rc == 2 and "does not look like LLMServingSim" in capsys.readouterr().err


def test_unknown_names_and_tp_list_what_exists(vidur_slice, lss_slice, tmp_path, capsys):
    vroot = vidur_slice[0]
    lroot = lss_slice[0]
    out = tmp_path / "p.json"
    assert run(["vidur", vroot, "--model", "llama-2-7b", "--hardware", "b200", "--out", out]) == 2
    assert "a100, a40, h100" in capsys.readouterr().err
    assert run(["vidur", vroot, "--model", "gpt-9", "--hardware", "a100", "--out", out]) == 2
    assert "llama-2-7b" in capsys.readouterr().err
    assert run(["vidur", vroot, "--model", "llama-2-7b", "--hardware", "a100", "--tp", "3", "--out", out]) == 2
    assert "[1, 2, 4, 8]" in capsys.readouterr().err
    assert run(["vidur", vroot, "--model", "llama-2-7b", "--hardware", "h100", "--out", out]) == 2
    assert "device folders: a100, a40" in capsys.readouterr().err
    assert run(["llmservingsim", lroot, "--model", "llama-3.1-8b", "--hardware", "rtx-4090", "--tp", "2", "--out", out]) == 2
    assert "TP folders: tp1" in capsys.readouterr().err
    assert run(["llmservingsim", lroot, "--model", "qwen3-32b", "--hardware", "rtx-4090", "--out", out]) == 2
    assert "meta-llama/Llama-3.1-8B" in capsys.readouterr().err
    assert not out.exists()


def test_missing_column_names_the_file(vidur_slice, tmp_path, capsys):
    root = vidur_slice[0]
    f = root / MLP_REL
    text = f.read_text().replace("time_stats.add.median", "time_stats.add.p50")
    f.write_text(text)
    assert run(["vidur", root, "--model", "llama-2-7b", "--hardware", "a100", "--out", tmp_path / "p.json"]) == 2
    err = capsys.readouterr().err
    assert "mlp.csv" in err and "time_stats.add.median" in err


# ------------------------------------------------------------------------------------------------
# the committed profiles
# ------------------------------------------------------------------------------------------------

COMMITTED = sorted(IMPORTED.glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_profiles_load_and_match_their_name(path):
    from kvsim.cost.profile import load_profile

    prof = load_profile(path)
    hw, model, tp = path.stem.split("__")
    assert (prof.hardware, prof.model, f"tp{prof.tensor_parallel_size}") == (hw, model, tp)
    assert prof.tables and path.stat().st_size < 2_000_000
    assert prof.provenance["command"].startswith("kvprof import ")
    for rec in prof.provenance["files"]:
        assert len(rec["sha256"]) == 64


@pytest.mark.parametrize("name", ["rtx-4090__llama-3.1-8b__tp1.json", "a100__llama-2-7b__tp2.json"])
def test_committed_profile_regenerates(name, tmp_path, monkeypatch):
    need(SHARED / "reference")
    committed = json.loads((IMPORTED / name).read_text())
    argv = shlex.split(committed["provenance"]["command"])[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / name)
    monkeypatch.chdir(REPO)  # the recorded command uses paths relative to the repository root
    assert import_main(argv) == 0
    fresh = json.loads((tmp_path / name).read_text())
    assert fresh["tables"] == committed["tables"]
    assert fresh["provenance"]["files"] == committed["provenance"]["files"]
