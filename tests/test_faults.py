"""Faults a hostile user can cause, and what kvsim promises instead (docs/invariants.md, "faults"):

- a sweep worker that dies costs only the cell it held (recorded ``lost``, rerun next time); workers never
  outlive the sweep (SIGKILL of the parent included); SIGTERM stops the sweep and its workers cleanly;
  killing a worker and then the parent mid-run, then rerunning, does every cell exactly once;
- a sweep cell is keyed on the content of its inputs (trace, profile, model config, kvsim version), not
  only its parameters;
- a replay that fails or is killed leaves ``--out`` as it was; an input inside ``--out`` is never
  overwritten;
- a profile of another model, GPU or TP is refused (or used with a warning when asked for);
- one over-long prompt is rejected and counted (``exceeds_max_model_len``), the rest served.

Process-kill tests poll with generous timeouts and gate the workers on files, never on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvsim import api
from kvsim.cli import main
from kvsim.errors import ConfigError
from kvsim.plan import cell_id, load_grid, read_cells, run_sweep
from kvsim.plan import sweep as sweep_mod

from conftest import TINY, make_request, small_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "traces" / "sample.jsonl"
SHARED = REPO.parent / "shared"
PROFILE_4090 = REPO / "kvsim" / "profiles" / "imported" / "rtx-4090__llama-3.1-8b__tp1.json"
POSIX_FORK = hasattr(os, "fork") and sys.platform != "darwin"
TIMEOUT_S = 120  # a loaded 2-core machine can be slow; every wait polls up to this long


def wait_for(cond, what: str, timeout_s: float = TIMEOUT_S):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def grid(trace=SAMPLE, **over) -> dict:
    g = {"trace": str(trace), "limit": 10, "method": ["none", "fp8", "kivi:bits=2"], "num_replicas": [1, 2]}
    g.update(over)
    return g


def ok_rows_per_cell(path: Path) -> dict:
    counts: dict = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("status") == "ok":
            counts[row["cell_id"]] = counts.get(row["cell_id"], 0) + 1
    return counts


# -- 1. a dead worker costs only its cell -----------------------------------------------------------------------
@pytest.mark.skipif(not POSIX_FORK, reason="needs fork (the patched cell runner is inherited by the workers)")
def test_a_dead_worker_costs_only_the_cell_it_held(tmp_path, monkeypatch):
    """Regression: one SIGKILLed worker broke the whole ProcessPoolExecutor, every pending cell was recorded
    as 'worker failed: BrokenProcessPool', and a plain rerun skipped them all."""
    g = grid()
    victim = load_grid(g).cells()[2]
    real = sweep_mod.run_cell

    def run_cell(params, base_dir=None):
        if params == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(params, base_dir)

    monkeypatch.setenv("KVSIM_MP_START", "fork")
    monkeypatch.setattr(sweep_mod, "run_cell", run_cell)
    res = run_sweep(g, tmp_path, jobs=2, progress=False)
    by_status = {}
    for r in res.rows:
        by_status.setdefault(r["status"], []).append(r)
    assert [r["cell_id"] for r in by_status["lost"]] == [cell_id(victim)]
    assert "SIGKILL" in by_status["lost"][0]["error"] and "rerun retries it" in by_status["lost"][0]["error"]
    assert len(by_status["ok"]) == 5 and set(by_status) == {"ok", "lost"}
    assert (res.ran, res.failed, res.lost) == (6, 1, 1)

    monkeypatch.setattr(sweep_mod, "run_cell", real)
    again = run_sweep(g, tmp_path, jobs=2, progress=False)
    assert (again.ran, again.skipped, again.failed) == (1, 5, 0)
    assert all(r["status"] == "ok" for r in again.rows)


# -- 2 + the fault test: kill a worker, kill the parent, rerun ------------------------------------------------------
DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from kvsim.plan import sweep

    ctl = Path(sys.argv[3])
    real = sweep.run_cell

    def gated(params, base_dir=None):  # announce the cell, wait until the test releases it
        cid = sweep.cell_id(params)
        (ctl / f"started-{cid}").write_text(str(os.getpid()))
        t0 = time.monotonic()
        while not (ctl / f"release-{cid}").exists() and time.monotonic() - t0 < 300:
            time.sleep(0.02)
        return real(params, base_dir)

    sweep.run_cell = gated  # forked workers inherit it
    from kvsim.cli import main
    sys.exit(main(["sweep", sys.argv[2], "--out", sys.argv[1], "--jobs", "2", "--quiet"]))
""")


def start_driver(tmp_path: Path, g: dict):
    gpath = tmp_path / "grid.yaml"
    gpath.write_text(json.dumps(g))  # JSON is YAML
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    env = {**os.environ, "KVSIM_MP_START": "fork", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "out"), str(gpath), str(ctl)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ctl


def started(ctl: Path) -> dict:
    """cell id -> worker pid, for every cell a worker has begun."""
    out = {}
    for p in ctl.glob("started-*"):
        text = p.read_text()
        if text:
            out[p.name.removeprefix("started-")] = int(text)
    return out


def started_n(ctl: Path, n: int) -> dict | None:
    s = started(ctl)
    return s if len(s) == n else None


@pytest.mark.skipif(not POSIX_FORK, reason="needs fork and POSIX signals")
def test_sweep_fault_kill_a_worker_then_the_parent_then_rerun(tmp_path):
    """Every cell ends done exactly once: a SIGKILLed worker's cell is recorded lost and retried, the
    cells in flight when the parent is SIGKILLed are rerun, and no worker outlives its parent."""
    g = grid()
    proc, ctl = start_driver(tmp_path, g)
    try:
        first = wait_for(lambda: started_n(ctl, 2), "two workers holding a cell")
        (victim, victim_pid), (other, _) = sorted(first.items())
        os.kill(victim_pid, signal.SIGKILL)
        (ctl / f"release-{other}").touch()
        cells = tmp_path / "out" / "cells.jsonl"
        # the parent records the lost cell, the released one finishes, and both workers take a next cell
        wait_for(lambda: cells.exists() and len(read_cells(cells)) == 2 and len(started(ctl)) == 4,
                 "the lost and the finished cell recorded, two new cells started")
        rows = read_cells(cells)
        assert rows[victim]["status"] == "lost" and rows[other]["status"] == "ok"
        workers = set(started(ctl).values()) - {victim_pid}
        assert all(alive(p) for p in workers)
        proc.kill()  # SIGKILL: the parent runs no cleanup at all
        proc.wait(TIMEOUT_S)
        wait_for(lambda: not any(alive(p) for p in workers), "the workers to die with their parent")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started(ctl).values():  # never leave a process behind, whatever failed above
            if alive(p):
                os.kill(p, signal.SIGKILL)

    res = run_sweep(g, tmp_path / "out", jobs=2, progress=False)
    assert (res.ran, res.skipped) == (5, 1)  # everything but the one finished cell, the lost one included
    ids = {cell_id(c) for c in load_grid(g).cells()}
    assert ok_rows_per_cell(cells) == {i: 1 for i in ids}
    assert set(read_cells(cells)) == ids and all(r["status"] == "ok" for r in res.rows)


@pytest.mark.skipif(not POSIX_FORK, reason="needs fork and POSIX signals")
def test_sigterm_stops_the_sweep_and_its_workers(tmp_path):
    proc, ctl = start_driver(tmp_path, grid())
    try:
        held = wait_for(lambda: started_n(ctl, 2), "two workers holding a cell")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in err and "Traceback" not in err
        wait_for(lambda: not any(alive(p) for p in held.values()), "the workers to be stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started(ctl).values():
            if alive(p):
                os.kill(p, signal.SIGKILL)


# -- 3. content-keyed resume ---------------------------------------------------------------------------------------
def test_a_changed_trace_at_the_same_path_reruns_its_cells(tmp_path):
    """Regression: the resume key was the parameters only, so a rerun reused results of the old content."""
    trace = tmp_path / "trace.jsonl"
    lines = SAMPLE.read_text().splitlines()
    trace.write_text("\n".join(lines[:20]) + "\n")
    g = grid(trace=trace, method=["none", "fp8"], num_replicas=[1])
    first = run_sweep(g, tmp_path / "out", jobs=1, progress=False)
    assert run_sweep(g, tmp_path / "out", jobs=1, progress=False).skipped == 2  # unchanged: skipped
    # same path, new content: every request twice as long
    reqs = [json.loads(x) for x in lines[:20]]
    trace.write_text("".join(json.dumps({**r, "prompt_tokens": 2 * r["prompt_tokens"]}) + "\n" for r in reqs))
    second = run_sweep(g, tmp_path / "out", jobs=1, progress=False)
    assert (second.ran, second.skipped) == (2, 0)
    assert [r["total_input_tokens"] for r in second.rows] == [2 * r["total_input_tokens"] for r in first.rows]
    assert all(r["inputs_sha"] != f["inputs_sha"] for r, f in zip(second.rows, first.rows))


def test_the_resume_key_covers_profile_model_file_and_version(tmp_path, monkeypatch):
    prof = tmp_path / "p.json"
    prof.write_bytes(PROFILE_4090.read_bytes())
    model = tmp_path / "llama-3.1-8b.json"
    model.write_bytes((REPO / "kvsim" / "specs" / "data" / "models" / "llama-3.1-8b.json").read_bytes())
    params = {"trace": str(SAMPLE), "profile": str(prof), "model": str(model)}
    base = sweep_mod.inputs_sha(params)
    assert sweep_mod.inputs_sha(dict(params)) == base
    prof.write_text(prof.read_text() + "\n")
    assert sweep_mod.inputs_sha(params) != base
    changed = sweep_mod.inputs_sha(params)
    model.write_text(model.read_text() + "\n")
    assert sweep_mod.inputs_sha(params) != changed
    changed = sweep_mod.inputs_sha(params)
    monkeypatch.setattr("kvsim.__version__", "999.0")
    assert sweep_mod.inputs_sha(params) != changed
    # auto: the committed profile the cell will load is part of the key
    auto = {"trace": str(SAMPLE), "model": "llama-3.1-8b", "hardware": "rtx-4090"}
    assert sweep_mod._profile_path(auto, REPO) == str(PROFILE_4090)
    assert sweep_mod._profile_path({**auto, "profile": "none"}, REPO) is None


def test_non_utf8_cells_file_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "cells.jsonl").write_bytes(b'{"cell_id": "a", "status": "ok"}\n{"cell_id": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"cells.jsonl:2: not valid UTF-8"):
        read_cells(tmp_path / "cells.jsonl")


# -- 4. atomic replay outputs ------------------------------------------------------------------------------------
def outputs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_failed_replay_leaves_the_previous_outputs_untouched(tmp_path, capsys):
    """Regression: a replay that stopped on a bad line left new partial requests.csv / timeline.csv beside
    the previous run's summary.json."""
    out = tmp_path / "out"
    assert main(["replay", str(SAMPLE), "--limit", "30", "--out", str(out), "--quiet"]) == 0
    before = outputs(out)
    assert set(before) == {"requests.csv", "timeline.csv", "timeline.png", "summary.json"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(SAMPLE.read_text().splitlines()[:50]) + '\n{"arrival_time_s": 1e9, "prompt_tokens": 0}\n')
    assert main(["replay", str(bad), "--out", str(out), "--quiet"]) == 2
    assert "bad.jsonl:51:" in capsys.readouterr().err
    assert outputs(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_an_interrupted_replay_leaves_the_previous_outputs_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    api.replay(str(SAMPLE), limit=20, out_dir=out, auto_profile=False)
    before = outputs(out)

    def interrupted(stream):  # Ctrl-C in the middle of the run
        for i, r in enumerate(stream):
            if i == 10:
                raise KeyboardInterrupt
            yield r

    import kvsim.replay

    real_open = kvsim.replay.open_trace
    monkeypatch.setattr(kvsim.replay, "open_trace", lambda *a, **k: interrupted(real_open(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        api.replay(str(SAMPLE), limit=40, out_dir=out, auto_profile=False)
    assert outputs(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


@pytest.mark.skipif(not POSIX_FORK, reason="needs POSIX signals")
def test_a_killed_replay_leaves_the_previous_outputs_untouched(tmp_path):
    out = tmp_path / "out"
    assert main(["replay", str(SAMPLE), "--limit", "30", "--out", str(out), "--quiet"]) == 0
    before = outputs(out)
    killer = textwrap.dedent("""
        import os, signal, sys
        from kvsim import replay
        real = replay.open_trace
        def dying(*a, **k):
            for i, r in enumerate(real(*a, **k)):
                if i == 20:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-run, after rows were written
                yield r
        replay.open_trace = dying
        from kvsim.cli import main
        main(["replay", sys.argv[1], "--out", sys.argv[2], "--quiet"])
    """)
    proc = subprocess.run([sys.executable, "-c", killer, str(SAMPLE), str(out)], capture_output=True,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert outputs(out) == before
    assert [p.name.startswith(".partial-") for p in out.iterdir() if p.is_dir()] == [True]
    # the next run into the same folder clears the dead run's staging folder
    assert main(["replay", str(SAMPLE), "--limit", "5", "--out", str(out), "--quiet"]) == 0
    assert not [p for p in out.iterdir() if p.is_dir()]


def test_an_input_inside_out_is_never_overwritten(tmp_path, capsys):
    """Regression: a trace named like an output inside --out was truncated before it was read."""
    out = tmp_path / "out"
    out.mkdir()
    trace = out / "requests.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    before = trace.read_bytes()
    assert main(["replay", str(trace), "--out", str(out), "--quiet"]) == 2
    assert "would be overwritten" in capsys.readouterr().err and trace.read_bytes() == before
    other = out / "my-trace.jsonl"  # any other name inside --out is an ordinary input, left alone
    other.write_bytes(SAMPLE.read_bytes())
    assert main(["replay", str(other), "--limit", "5", "--out", str(out), "--quiet"]) == 0
    assert other.read_bytes() == SAMPLE.read_bytes() and (out / "summary.json").is_file()


# -- 5. profile match ------------------------------------------------------------------------------------------------
def test_a_profile_of_another_model_gpu_or_tp_is_refused():
    """Regression: --model qwen3-32b --hardware h100 --profile rtx-4090__llama-3.1-8b__tp1.json ran and exited 0."""
    with pytest.raises(ConfigError, match=r"model 'llama-3.1-8b' \(run: 'qwen3-32b'\), hardware 'rtx-4090' "
                                          r"\(run: 'h100'\)"):
        api.make_spec("qwen3-32b", "h100", None, profile=PROFILE_4090)
    from kvsim.config import EngineConfig
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 1 \(run: 2\)"):
        api.make_spec("llama-3.1-8b", "rtx-4090", None, EngineConfig(tensor_parallel_size=2), profile=PROFILE_4090)
    assert api.make_spec("llama-3.1-8b", "rtx-4090", None, profile=PROFILE_4090).profile is not None  # the match
    with pytest.warns(api.ProfileMismatchWarning, match="measured for another setup"):
        spec = api.make_spec("qwen3-32b", "h100", None, profile=PROFILE_4090, allow_profile_mismatch=True)
    assert spec.profile.model == "llama-3.1-8b"
    # a lengths-only profile (no kernel tables) supplies output lengths to any model, as docs/lengths.md says
    lengths = REPO / "kvsim" / "profiles" / "lengths" / "smollm2-135m-instruct.json"
    assert api.make_spec("llama-3.1-8b", "h100", None, profile=lengths).profile.tables == {}


def test_allow_profile_mismatch_on_the_command_line(tmp_path, capsys):
    args = ["replay", str(SAMPLE), "--limit", "5", "--model", "qwen3-32b", "--profile", str(PROFILE_4090),
            "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    with pytest.warns(api.ProfileMismatchWarning):
        assert main(args + ["--allow-profile-mismatch"]) == 0


# -- 6. accepted nonsense -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"rate_scale": float("nan")}, "rate_scale=nan"), ({"rate_scale": float("inf")}, "rate_scale=inf"),
    ({"limit": -1}, "limit=-1"), ({"slo": {"ttft_ms": -5}}, "ttft_ms=-5"), ({"slo": {"tpot_ms": float("nan")}}, "nan"),
    ({"method": "h2o:budget=256,budget=512"}, "given twice"),
])
def test_nonsense_arguments_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        api.replay([make_request("a", 0.0, 8, 2)], model=TINY, config=small_config(), **kw)


def test_tensor_parallelism_must_divide_the_heads():
    from kvsim.config import EngineConfig

    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3: the 32 attention heads"):
        api.make_spec("llama-3.1-8b", "h100", None, EngineConfig(tensor_parallel_size=3))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2: the 9 attention heads"):
        api.make_spec("smollm2-135m", "h100", None, EngineConfig(tensor_parallel_size=2))
    # KV heads fewer than the ranks are replicated (vLLM): 8 KV heads on 16 ranks, 64 query heads
    assert api.make_spec("llama-3.1-70b", "h100", None, EngineConfig(tensor_parallel_size=16)).config.tensor_parallel_size == 16


def test_the_does_not_fit_hint_names_the_batch_token_budget_when_that_is_the_cause():
    """Regression: the hint always said 'raise tensor_parallel_size or gpu_memory_utilization', also when the
    weights fit and the activation reserve of a huge max_num_batched_tokens took the memory."""
    from kvsim.config import EngineConfig

    with pytest.raises(ConfigError, match=r"lower max_num_batched_tokens \(without chunked prefill it defaults to "
                                          r"max_model_len"):
        api.replay([make_request("a", 0.0, 8, 2)], "llama-3.1-8b", "rtx-4090",
                   config=EngineConfig(enable_chunked_prefill=False), auto_profile=False)
    with pytest.raises(ConfigError, match=r"activation reserve .* max_num_batched_tokens=200000.*; lower "
                                          r"max_num_batched_tokens$"):
        api.replay([make_request("a", 0.0, 8, 2)], "llama-3.1-8b", "rtx-4090",
                   config=EngineConfig(max_num_batched_tokens=200000), auto_profile=False)
    with pytest.raises(ConfigError, match=r"weights 141\.\d+ GB.*raise tensor_parallel_size \(the weights alone"):
        api.replay([make_request("a", 0.0, 8, 2)], "llama-3.1-70b", "h100", auto_profile=False)


# -- 8. an over-long prompt is one rejected request, not a dead run ------------------------------------------------
def test_an_over_long_prompt_is_rejected_and_counted_and_the_rest_served(tmp_path):
    """Regression: a prompt longer than max_model_len stopped the whole replay with a trace error, while a
    prompt + output over it was rejected and counted. vLLM answers it with an error and serves the rest."""
    trace = tmp_path / "t.jsonl"
    rows = [{"arrival_time_s": 0.0, "prompt_tokens": 100, "output_tokens": 10},
            {"arrival_time_s": 0.1, "prompt_tokens": 5000, "output_tokens": 10},   # prompt alone too long
            {"arrival_time_s": 0.2, "prompt_tokens": 100, "output_tokens": 10}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["replay", str(trace), "--max-model-len", "4096", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (s["num_requests"], s["completed"], s["rejected"]) == (3, 2, 1)
    assert s["rejected_reasons"] == {"exceeds_max_model_len": 1}
    got = (tmp_path / "o" / "requests.csv").read_text().splitlines()
    assert sum("exceeds_max_model_len" in line for line in got) == 1


@pytest.mark.skipif(not (SHARED / "traces" / "mooncake_fast25" / "synthetic_trace.jsonl").exists(),
                    reason="needs ../shared/traces/mooncake_fast25")
def test_the_shipped_mooncake_synthetic_trace_replays(tmp_path):
    """Its line 250 has a 134,773-token prompt, above Llama-3.1-8B's 131,072."""
    trace = SHARED / "traces" / "mooncake_fast25" / "synthetic_trace.jsonl"
    res = api.replay(str(trace), limit=260, auto_profile=False)
    s = res.summary
    assert s["rejected_reasons"].get("exceeds_max_model_len", 0) >= 1
    assert s["num_requests"] == 260 == s["completed"] + s["rejected"]
