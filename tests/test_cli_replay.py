"""Rejections and input errors: requests the engine can never serve are rejected with a reason and
counted; bad trace lines and bad options stop ``kvsim replay`` with exit code 2 and a message that
names the file, line, field, key or value (or are counted with ``--skip-invalid``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from kvsim import api
from kvsim.cli import main
from kvsim.errors import ConfigError

from conftest import TINY, make_request, small_config


# -- engine rejections ----------------------------------------------------------------------------------
def test_request_whose_kv_can_never_fit_is_rejected_kv_capacity():
    cfg = small_config(num_gpu_blocks_override=4, block_size=4)           # 16 tokens of KV
    reqs = [make_request("fits", 0.0, 8, 8), make_request("never", 0.0, 12, 8), make_request("ok", 0.1, 4, 2)]
    res = api.replay(reqs, model=TINY, config=cfg, check_invariants=True)
    rows = {r["request_id"]: r for r in res.rows}
    assert rows["never"]["status"] == "rejected" and rows["never"]["reject_reason"] == "kv_capacity"
    assert rows["fits"]["status"] == rows["ok"]["status"] == "completed"
    s = res.summary
    assert s["rejected_reasons"] == {"kv_capacity": 1}
    assert (s["num_requests"], s["completed"], s["rejected"]) == (3, 2, 1)
    # the last sampled token's KV is never computed: 8 + 9 - 1 = 16 tokens is exactly the pool
    res = api.replay([make_request("edge", 0.0, 8, 9)], model=TINY, config=cfg, check_invariants=True)
    assert res.summary["completed"] == 1


def test_request_longer_than_max_model_len_is_rejected():
    cfg = small_config(max_model_len=128)
    reqs = [make_request("long", 0.0, 100, 29), make_request("edge", 0.0, 100, 28)]
    res = api.replay(reqs, model=TINY, config=cfg)
    rows = {r["request_id"]: r for r in res.rows}
    assert rows["long"]["reject_reason"] == "exceeds_max_model_len"
    assert rows["edge"]["status"] == "completed"
    assert res.summary["rejected_reasons"] == {"exceeds_max_model_len": 1}


def unchecked_spec(**cfg):
    """A spec with a budget below max_model_len without chunking, which config validation refuses (as vLLM
    does): built past the check, to test the engine's own guard for such requests."""
    mml = cfg.pop("max_model_len")
    spec = api.make_spec(TINY, "h100", None, small_config(max_model_len=cfg["max_num_batched_tokens"], **cfg),
                         auto_profile=False)
    spec.config = dataclasses.replace(spec.config, max_model_len=mml)
    return spec


@pytest.mark.parametrize("unchunked", [{"scheduler": "prefill-first"}, {"enable_chunked_prefill": False}])
def test_budget_below_max_model_len_without_chunking_is_refused_the_same_way(unchunked):
    """Regression: prefill-first used to accept what --no-enable-chunked-prefill refused."""
    with pytest.raises(ConfigError, match="max_num_batched_tokens=32: is smaller than max_model_len=256.*raise "
                                          "max_num_batched_tokens or lower max_model_len"):
        api.make_spec(TINY, "h100", None, small_config(max_num_batched_tokens=32, max_model_len=256, **unchunked))


def test_prompt_over_the_budget_without_chunking_is_rejected():
    spec = unchecked_spec(scheduler="prefill-first", max_num_batched_tokens=32, max_model_len=256)
    res = api.replay([make_request("big", 0.0, 40, 2), make_request("small", 0.0, 30, 2)], spec=spec)
    assert res.summary["rejected_reasons"] == {"prompt_exceeds_max_num_batched_tokens": 1}
    assert res.summary["completed"] == 1


def test_prefill_first_recompute_longer_than_the_budget_is_dropped_not_stalled():
    """Regression: prefill-first never chunks, so a request preempted after its prompt + generated tokens
    outgrew max_num_batched_tokens could never be scheduled again and the run stalled ("simulation
    stalled with work left"). vLLM V0 ignores such a request; kvsim rejects it with the budget reason."""
    spec = unchecked_spec(scheduler="prefill-first", max_num_batched_tokens=32, max_model_len=256,
                          num_gpu_blocks_override=20, block_size=4, max_num_seqs=4)
    reqs = [make_request(i, 0.0, 30, 30) for i in range(2)]
    for ff in (True, False):
        res = api.replay(reqs, spec=spec, check_invariants=True, fast_forward=ff)
        s = res.summary
        assert s["num_preemptions"] >= 1
        assert s["completed"] + s["rejected"] == 2 == s["num_requests"]
        assert s["rejected_reasons"] == {"prompt_exceeds_max_num_batched_tokens": 1}
        dropped = [r for r in res.rows if r["status"] == "rejected"]
        assert dropped[0]["request_id"] == "1"                        # the newest was preempted


# -- the command line ------------------------------------------------------------------------------------------
GOOD = {"arrival_time_s": 0.0, "prompt_tokens": 10, "output_tokens": 5}


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def bad_trace(tmp_path):
    return write_lines(tmp_path / "bad.jsonl", [
        GOOD,
        dict(GOOD, arrival_time_s=0.1),
        {"arrival_time_s": 0.2, "output_tokens": 5},                     # line 3: prompt_tokens missing
        dict(GOOD, arrival_time_s=0.3, prompt_tokens=0),                 # line 4: non-positive
        "{not json",                                                     # line 5
        dict(GOOD, arrival_time_s=0.4, output_tokens=2.5),               # line 6: non-integer
        dict(GOOD, arrival_time_s=0.5),
    ])


def replay(args, capsys):
    rc = main(["replay", *map(str, args), "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_trace_line_names_file_line_and_field(tmp_path, capsys):
    trace = bad_trace(tmp_path)
    rc, _, err = replay([trace, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert f"{trace}:3: field 'prompt_tokens'" in err
    assert "Traceback" not in err


def test_skip_invalid_counts_bad_lines_in_the_summary(tmp_path, capsys):
    trace = bad_trace(tmp_path)
    out = tmp_path / "out"
    rc, stdout, _ = replay([trace, "--out", out, "--skip-invalid"], capsys)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rejected_reasons"] == {"invalid_missing_field": 1, "invalid_non_positive": 1, "invalid_bad_json": 1,
                                     "invalid_non_integer": 1}
    assert (s["num_requests"], s["completed"], s["rejected"]) == (7, 3, 4)
    lines = (out / "requests.csv").read_text().splitlines()
    assert len(lines) == 1 + 7
    assert any(line.startswith("line-3,") and "invalid_missing_field" in line for line in lines)
    assert "rejected 4" in stdout


@pytest.mark.parametrize("flag,value,known", [("--model", "gpt-17", "llama-3.1-8b"),
                                              ("--hardware", "tpu-v9", "h100"),
                                              ("--method", "magic", "h2o")])
def test_unknown_names_list_the_known_ones(tmp_path, capsys, flag, value, known):
    trace = write_lines(tmp_path / "t.jsonl", [GOOD])
    rc, _, err = replay([trace, "--out", tmp_path / "out", flag, value], capsys)
    assert rc == 2
    assert repr(value) in err and known in err


def test_bad_engine_flag_names_key_and_value(tmp_path, capsys):
    trace = write_lines(tmp_path / "t.jsonl", [GOOD])
    rc, _, err = replay([trace, "--out", tmp_path / "out", "--block-size", "0"], capsys)
    assert rc == 2
    assert "block_size=0" in err


def test_unknown_config_key_names_file_key_and_value(tmp_path, capsys):
    trace = write_lines(tmp_path / "t.jsonl", [GOOD])
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("max_num_seqs: 4\nmax_num_seq: 8\n")
    rc, _, err = replay([trace, "--out", tmp_path / "out", "--config", cfg], capsys)
    assert rc == 2
    assert str(cfg) in err and "'max_num_seq'" in err and "8" in err


def test_bad_config_value_names_key_and_value(tmp_path, capsys):
    trace = write_lines(tmp_path / "t.jsonl", [GOOD])
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("gpu_memory_utilization: 1.5\n")
    rc, _, err = replay([trace, "--out", tmp_path / "out", "--config", cfg], capsys)
    assert rc == 2
    assert "gpu_memory_utilization=1.5" in err


def test_installed_entry_point_exit_code(tmp_path):
    """The real ``kvsim`` process (not just main()): exit status 2 and the message on stderr."""
    trace = bad_trace(tmp_path)
    p = subprocess.run([sys.executable, "-m", "kvsim.cli", "replay", str(trace), "--out", str(tmp_path / "o"),
                        "--quiet"], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert f"{trace}:3: field 'prompt_tokens'" in p.stderr
